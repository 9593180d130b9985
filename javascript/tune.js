// sd-webui-tune: the Tune tab's live progress and its "Use it" button.
//
// Progress: gradio 3.41 has no reliable server push inside the webui, so a timer clicks the hidden #tune_poll
// button (lib_tune/ui/tab.py answers with the current job) while the Tune tab is visible and the shown job is
// queued or running, and once whenever the tab is opened (a reload or a return to the tab shows a running job).
// One poll at a time: the progress box carries data-poll, a counter that changes with every answer.

(function() {
    var POLL_MS = 1500;
    var STALE_MS = 20000; // a poll that never answered (server restart) does not block the timer forever
    var pending = null; // {poll: data-poll value when clicked, at: time}

    function tuneTabVisible() {
        var tab = gradioApp().getElementById('tab_tune_tab');
        return !!tab && tab.style.display !== 'none' && !document.hidden;
    }

    function progressBox() {
        return gradioApp().querySelector('#tune_progress .tune-progress');
    }

    function answered() {
        if (!pending) return true;
        var box = progressBox();
        if ((box && box.dataset.poll !== pending.poll) || Date.now() - pending.at > STALE_MS) {
            pending = null;
            return true;
        }
        return false;
    }

    function poll() {
        var button = gradioApp().getElementById('tune_poll');
        if (!button || !answered()) return;
        var box = progressBox();
        pending = {poll: box ? box.dataset.poll : null, at: Date.now()};
        button.click();
    }

    function tick() {
        if (!tuneTabVisible()) return;
        var box = progressBox();
        if (box && (box.dataset.state === 'running' || box.dataset.state === 'queued')) poll();
    }

    function scrollLog() {
        var pre = gradioApp().getElementById('tune_log_pre');
        if (pre && pre.dataset.tuneLen !== String(pre.textContent.length)) {
            pre.dataset.tuneLen = String(pre.textContent.length);
            pre.scrollTop = pre.scrollHeight;
        }
    }

    onUiLoaded(function() {
        setInterval(tick, POLL_MS);
        if (tuneTabVisible()) poll();
    });
    onUiTabChange(function() {
        if (tuneTabVisible()) poll();
    });
    document.addEventListener('visibilitychange', function() {
        if (tuneTabVisible()) poll();
    });
    onAfterUiUpdate(scrollLog);
})();

// "Use it": append the trained adapter's tag (and trigger) to the txt2img prompt and go there.
function tune_use_it(text) {
    var area = gradioApp().querySelector('#txt2img_prompt textarea');
    if (area && text) {
        var current = area.value.replace(/[\s,]+$/, '');
        if (current.indexOf(text) < 0) {
            area.value = current ? current + ', ' + text : text;
            updateInput(area);
        }
    }
    switch_to_txt2img();
    return [text];
}

// The webui's Train tab links to the Tune tab: a button at the top of #tab_train.
function tune_switch_to_tune_tab() {
    var tabs = gradioApp().querySelector('#tabs');
    if (!tabs) return;
    var buttons = tabs.querySelectorAll(':scope > .tab-nav > button');
    var items = Array.prototype.filter.call(tabs.children, function(el) {
        return el.classList.contains('tabitem');
    });
    // gradio 3.41 keeps the nav buttons in the order of the tab items; the label is the fallback
    var i = items.indexOf(gradioApp().getElementById('tab_tune_tab'));
    var button = i >= 0 && i < buttons.length && buttons[i].textContent.trim() === 'Tune' ? buttons[i] : null;
    if (!button) {
        button = Array.prototype.find.call(buttons, function(b) {
            return b.textContent.trim() === 'Tune';
        });
    }
    if (button) button.click();
}

onUiLoaded(function() {
    var train = gradioApp().getElementById('tab_train');
    if (!train || !gradioApp().getElementById('tab_tune_tab') || gradioApp().getElementById('tune_train_link')) return;
    var row = document.createElement('div');
    row.id = 'tune_train_link_row';
    row.style.margin = '0 0 0.7em 0';
    var button = document.createElement('button');
    button.id = 'tune_train_link';
    button.type = 'button';
    button.className = 'lg secondary gradio-button';
    button.style.cssText = 'padding: 0.5em 1.2em; font-weight: 600; cursor: pointer; ' +
        'border: 1px solid var(--button-secondary-border-color); border-radius: var(--button-large-radius); ' +
        'background: var(--button-secondary-background-fill); color: var(--button-secondary-text-color);';
    button.textContent = 'Train LoRA / LyCORIS / TI with sd-webui-tune \u2192';
    button.title = 'Open the Tune tab (sd-webui-tune): LoRA, LoCon, LoHa, LoKr, DoRA, textual inversion and pivotal ' +
        'tuning on the loaded checkpoint';
    button.addEventListener('click', tune_switch_to_tune_tab);
    row.appendChild(button);
    train.insertBefore(row, train.firstChild);
});
