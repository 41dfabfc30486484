"""Screenshot a workflow in a running ComfyUI with headless Chromium (the README's picture of the graph).

    python docs/screenshot_workflow.py http://127.0.0.1:8188 example_workflows/sd35_flash_4step.json \
        docs/comfyui_graph.png --run --crop 290,262,1775,660

It opens the ComfyUI page, loads the workflow with ``app.loadGraphData``, fits the view, optionally queues it
(so the loader's "detected" box and the images appear), and saves the window. It prints what the pack's web
extension put on the Flash Checkpoint Loader, which checks the extension in a real browser. Needs ``chromium`` on
PATH and ``aiohttp`` (ComfyUI's venv has it); the server should have the tutorial and minimap settings off
(POST /settings/Comfy.TutorialCompleted true, /settings/Comfy.Minimap.Visible false).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import time
import urllib.request

import aiohttp

DEBUG_PORT = 9333


class Page:
    """The first Chromium tab, driven over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.last_id = ws, 0

    async def call(self, method: str, **params):
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        async for message in self.ws:
            data = json.loads(message.data)
            if data.get("id") == self.last_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
        raise RuntimeError("Chromium closed the connection")

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")


def idle(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/queue", timeout=10) as response:
        queue = json.loads(response.read())
    return not queue["queue_running"] and not queue["queue_pending"]


async def screenshot(url: str, workflow: str, run: bool, size: tuple[int, int]) -> bytes:
    chrome = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--remote-debugging-port={DEBUG_PORT}", f"--window-size={size[0]},{size[1]}",
                               "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{DEBUG_PORT}/json", timeout=5) as response:
                    target = next(t for t in json.loads(response.read()) if t["type"] == "page")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("Chromium did not open its DevTools port")
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Page.navigate", url=url)
            for _ in range(120):
                await asyncio.sleep(1)
                if await page.js("!!(window.app && window.app.graph && window.app.canvas)"):
                    break
            await asyncio.sleep(3)
            await page.js(f"window.app.loadGraphData({workflow})")
            await asyncio.sleep(2)
            await page.js("window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            if run:
                await page.js("window.app.queuePrompt(0, 1)")
                await asyncio.sleep(2)
                for _ in range(600):
                    if idle(url):
                        break
                    await asyncio.sleep(1)
                await asyncio.sleep(3)
            detected = await page.js(
                "JSON.stringify(window.app.graph._nodes.filter(n => n.type === 'SD35FlashCheckpointLoader')"
                ".map(n => (n.widgets || []).filter(w => w.name === 'detected').map(w => w.value)))")
            print(f"detected box on the loader: {detected}")
            return base64.b64decode((await page.call("Page.captureScreenshot", format="png"))["data"])
    finally:
        chrome.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    parser.add_argument("workflow", help="a UI-format workflow JSON")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--run", action="store_true", help="queue the workflow before the screenshot")
    parser.add_argument("--size", default="2000,1000", help="window size W,H (default 2000,1000)")
    parser.add_argument("--crop", help="crop box left,top,right,bottom in window pixels")
    args = parser.parse_args()
    with open(args.workflow) as f:
        workflow = json.dumps(json.load(f))
    size = tuple(int(v) for v in args.size.split(","))
    png = asyncio.run(screenshot(args.url.rstrip("/"), workflow, args.run, size))
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(png))
    if args.crop:
        image = image.crop(tuple(int(v) for v in args.crop.split(",")))
    image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")


if __name__ == "__main__":
    main()
