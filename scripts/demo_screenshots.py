"""Take the README's screenshots of the demo: each tab, run once on the embedded models, in headless Chromium.

    .venv/bin/python scripts/demo_screenshots.py [--out docs] [--chromium /usr/bin/chromium]

Serves the demo in-process on a free loopback port, clicks each tab's run button with the page's default inputs,
waits for the results, and writes ``OUT/demo-images.png`` and ``OUT/demo-text.png``; then serves it again with the
embedded DiffusionGemma as the text model (``diffexit demo --text-model dllm/charlm/weights-gemma``) and writes
``OUT/demo-gemma.png``. Nothing leaves the machine: any request to another host is aborted.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    args = p.parse_args()
    if not args.chromium.is_file():
        p.error(f"no Chromium at {args.chromium}; on Debian: apt-get install -y chromium")
    from diffexit.app.demo import build_app
    from diffexit.dllm.charlm.gemma import GEMMA_WEIGHTS_DIR

    args.out.mkdir(parents=True, exist_ok=True)
    shots = [_serve_and_shoot(build_app(), args.chromium, [("images", args.out / "demo-images.png"),
                                                           ("text", args.out / "demo-text.png")]),
             _serve_and_shoot(build_app(text_model=GEMMA_WEIGHTS_DIR), args.chromium,
                              [("text", args.out / "demo-gemma.png")])]
    print("wrote " + ", ".join(str(path) for paths in shots for path in paths))


def _serve_and_shoot(app, chromium: Path, tabs: list[tuple[str, Path]]) -> list[Path]:
    """Serve ``app``, run each of ``tabs`` ("images" or "text") with its defaults and screenshot the page."""
    from playwright.sync_api import sync_playwright

    from diffexit.app.demo import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.route("**/*", lambda r: r.continue_() if urlparse(r.request.url).hostname in ("127.0.0.1", None)
                       else r.abort())
            page.goto(f"http://127.0.0.1:{port}/")
            for tab, path in tabs:
                if tab == "images":
                    page.locator("#run-images").click()
                    page.locator("#heatmap img").first.wait_for(state="visible")
                else:
                    page.get_by_role("tab", name="Text: ").click()
                    page.locator("#run-text").click()
                    page.locator("#trace img").first.wait_for(state="visible")
                page.screenshot(path=str(path), full_page=True)
            browser.close()
    finally:
        app.close()
    return [path for _, path in tabs]


if __name__ == "__main__":
    main()
