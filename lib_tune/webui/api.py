"""HTTP API routes under /tune/v1 (added on app start, also with --nowebui)."""
from . import status as webui_status


def _adapter_json(entry) -> dict:
    from ..library import summary
    return {
        "name": entry.name,
        "alias": entry.alias,
        "path": entry.path,
        "type": summary_type(entry),
        "architecture": entry.architecture,
        "hash": entry.shorthash,
        "metadata": summary(entry),
    }


def skipped_json(item) -> dict:
    """A file of the Lora folder that is not an adapter: its name (as an adapter's would be), path and why."""
    return {"name": None, "path": item.path, "error": item.reason, "skipped": True}


def summary_type(entry) -> str:
    """The network family from metadata (cheap), e.g. 'lora', 'lycoris.loha'; 'unknown' without metadata."""
    md = entry.metadata
    module = md.get("ss_network_module", "")
    args = md.get("ss_network_args", "")
    if "lycoris" in module:
        import json
        try:
            algo = json.loads(args).get("algo", "lycoris")
        except (ValueError, AttributeError):
            algo = "lycoris"
        return f"lycoris.{algo}"
    if module:
        return "lora"
    return "unknown"


def add_routes(app):
    from fastapi import HTTPException

    from . import networks

    @app.get("/tune/v1/status")
    def tune_status():
        return webui_status.status()

    @app.get("/tune/v1/model-hash")
    def tune_model_hash():
        from modules.call_queue import queue_lock
        with queue_lock:  # not while a generation is changing anything
            return webui_status.model_hash()

    @app.get("/tune/v1/adapters")
    def tune_adapters():
        """Every adapter, then every file that was skipped ({"path", "error", "skipped": true})."""
        lib = networks.runtime().library
        if not lib.entries:
            lib.refresh()
        out = []
        for e in lib.list():
            try:
                out.append(_adapter_json(e))
            except Exception as err:  # a file removed, replaced or unreadable since the scan: this entry only
                out.append({"name": e.name, "path": e.path, "error": f"{type(err).__name__}: {err}"})
        return out + [skipped_json(x) for x in lib.skipped]

    @app.post("/tune/v1/refresh")
    def tune_refresh():
        lib = networks.runtime().library
        n = lib.refresh()
        return {"adapters": n, "skipped": [skipped_json(x) for x in lib.skipped]}

    # ---- training -----------------------------------------------------------------------------------------------
    from fastapi import Body
    from fastapi.responses import JSONResponse

    from ..train.config_checks import ConfigError, check_name

    def _422(e: ConfigError):
        return JSONResponse(status_code=422, content={"detail": {"field": e.field, "message": e.message}})

    @app.post("/tune/v1/train")
    def tune_train(body: dict = Body(...)):
        from . import job_runner
        try:
            job = job_runner.start(body)
        except ConfigError as e:
            return _422(e)
        return {"id": job.id}

    @app.post("/tune/v1/validate")
    def tune_validate(body: dict = Body(...)):
        from . import job_runner
        try:
            return job_runner.check_dataset(body)
        except ConfigError as e:
            return _422(e)

    @app.get("/tune/v1/jobs")
    def tune_jobs():
        from . import job_runner
        return [j.to_dict(full=False) for j in job_runner.registry.list()]

    @app.get("/tune/v1/jobs/{job_id}")
    def tune_job(job_id: str):
        from . import job_runner
        job = job_runner.registry.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job '{job_id}' not found")
        return job.to_dict()

    @app.post("/tune/v1/jobs/{job_id}/interrupt")
    def tune_interrupt(job_id: str):
        from . import job_runner
        job = job_runner.interrupt(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job '{job_id}' not found")
        return job.to_dict(full=False)

    @app.get("/tune/v1/adapters/{name:path}")
    def tune_adapter(name: str):
        try:
            check_name("name", name, allow_folders=True)
        except ConfigError as e:
            return _422(e)
        e = networks.runtime().library.find(name)
        if e is None:
            raise HTTPException(status_code=404, detail=f"adapter '{name}' not found")
        return dict(_adapter_json(e), full_metadata=e.metadata)
