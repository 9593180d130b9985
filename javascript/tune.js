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
