"""A headless Chromium driven over the DevTools protocol, to test pages the way users see them.

Only what the tests need: open a page, evaluate JavaScript in it. It talks to Chromium with
trio-websocket, which the project already depends on, so no browser-driver package is needed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Flags for a headless browser that reaches nothing but the pages we open (root needs
# --no-sandbox; the rest stop its background traffic to the outside world).
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


class Page:
    def __init__(self, ws: trio_websocket.WebSocketConnection, session_id: str) -> None:
        self._ws = ws
        self.session_id = session_id

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression; a promise is awaited. An exception thrown (or a
        promise rejected) fails the test."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        result = await _command(self._ws, "Runtime.evaluate", params, self.session_id)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for_text(self, element_id: str, text: str) -> str:
        """Wait until the element's text contains ``text`` (watched by the page itself, with a
        MutationObserver); return the element's whole text."""
        return await self.evaluate(
            f"""new Promise((resolve) => {{
                const element = document.getElementById({json.dumps(element_id)});
                const check = () => element.innerText.includes({json.dumps(text)})
                    && (resolve(element.innerText), true);
                if (!check()) new MutationObserver(check).observe(
                    element, {{ childList: true, subtree: true, characterData: true }});
            }})"""
        )


# JavaScript, inside an async function of a page: imports the browser client from the origin
# the page script names ORIGIN (replaced by the test) into `FanoutClient`. A fresh Chromium on a
# loaded machine, right after a test stopped and continued a worker, sometimes fails its first
# fetch of the module ("Failed to fetch dynamically imported module"); curl fetched it 1,500
# times in a row without a failure. What is under test is the client, so the import is tried
# three times.
IMPORT_CLIENT = """
  let imported;
  for (let attempt = 1; ; attempt++) {
    try { imported = await import(ORIGIN + "/client.js?attempt=" + attempt); break; }
    catch (error) {
      if (attempt === 3) throw error;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  const { FanoutClient } = imported;
"""

# Resolves once the current document has loaded (at once if it has).
_LOADED = """new Promise((resolve) => document.readyState === "complete"
    ? resolve() : addEventListener("load", () => resolve()))"""

_command_ids = itertools.count(1)


async def _command(
    ws: trio_websocket.WebSocketConnection,
    method: str,
    params: dict[str, Any],
    session_id: str | None = None,
) -> dict[str, Any]:
    command_id = next(_command_ids)
    message: dict[str, Any] = {"id": command_id, "method": method, "params": params}
    if session_id is not None:
        message["sessionId"] = session_id
    await ws.send_message(json.dumps(message))
    while True:
        reply = json.loads(await ws.get_message())
        if reply.get("id") == command_id:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]


@asynccontextmanager
async def open_page(url: str, extra_flags: Sequence[str] = ()) -> AsyncIterator[Page]:
    """Open ``url`` in a fresh headless Chromium started with ``extra_flags`` too; the browser
    is gone when the block ends."""
    assert CHROMIUM is not None
    # The profile may still be written to by a dying helper process; its removal is best effort.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        async with trio.open_nursery() as nursery:
            command = [CHROMIUM, *CHROMIUM_FLAGS, *extra_flags, f"--user-data-dir={profile}"]
            with trio.fail_after(30):
                devtools_url = await nursery.start(_run_chromium, command)
            async with trio_websocket.open_websocket_url(
                devtools_url, max_message_size=16 * 1024 * 1024
            ) as ws:
                target = await _command(ws, "Target.createTarget", {"url": "about:blank"})
                attached = await _command(
                    ws, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                )
                page = Page(ws, attached["sessionId"])
                # Navigate only now, and wait for the load: what the test evaluates then runs in
                # the page, never in the blank document that precedes it.
                with trio.fail_after(30):
                    await _command(ws, "Page.navigate", {"url": url}, page.session_id)
                    await page.evaluate(_LOADED)
                yield page
            nursery.cancel_scope.cancel()


async def _run_chromium(command: list[str], *, task_status: trio.TaskStatus[str]) -> None:
    """Run Chromium; report its DevTools address, then keep draining its log until it ends."""
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its renderers and helpers too are stopped at the end
    )
    assert process.stderr is not None
    try:
        seen = b""
        reported = False
        while chunk := await process.stderr.receive_some():
            if not reported:
                seen += chunk
                if match := re.search(rb"DevTools listening on (ws://\S+)", seen):
                    task_status.started(match.group(1).decode())
                    reported = True
        if not reported:
            raise AssertionError(f"Chromium exited: {seen.decode(errors='replace')}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
