"""Serving the demo: loopback by default, never shared, no analytics, system fonts, and a page title in the HTML."""

from __future__ import annotations

import html
from typing import Optional

import gradio as gr
from starlette.middleware import Middleware

THEME_FONTS = ["ui-sans-serif", "system-ui", "DejaVu Sans", "sans-serif"]
THEME_MONO = ["ui-monospace", "DejaVu Sans Mono", "monospace"]


class PageTitle:
    """ASGI middleware: the page's HTML (``GET /``) carries ``<title>`` from the server.

    gradio's page template has no ``<title>``; its script sets one only once the app has rendered (seconds, a
    minute on a busy machine), so until then a browser tab shows the bare address, and anything that reads the
    HTML without running it (a link preview, a bookmark, ``curl``) sees no title at all.
    """

    def __init__(self, app, title: str):
        self.app, self.tag = app, f"<title>{html.escape(title)}</title>".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/":
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def with_title(message):
            if message["type"] == "http.response.start":
                start.update(message)  # sent with the body, whose length changes
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(chunks)
            if b"<title>" not in page:
                page = page.replace(b"<head>", b"<head>" + self.tag, 1)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, with_title)


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: Optional[int] = None, *, block: bool = True):
    """Serve ``app`` on ``host:port``: never shared publicly, client-side rendering, system fonts (no font CDN), and
    the app's title in the page's HTML (:class:`PageTitle`).

    With ``block=False`` it returns once the server is up (``app.close()`` stops it).
    """
    theme = gr.themes.Default(font=THEME_FONTS, font_mono=THEME_MONO)
    return app.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=not block, inbrowser=False,
        quiet=not block, ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False, theme=theme,
        app_kwargs={"middleware": [Middleware(PageTitle, title=app.title)]},
    )
