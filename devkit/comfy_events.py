"""Watching a prompt's websocket events (progress, executing, interrupted), as the browser does."""
from __future__ import annotations

import asyncio
import json
import uuid
from typing import Callable

import aiohttp

DONE = ("execution_success", "execution_error", "execution_interrupted")


async def _run(server, prompt: dict, on_event: Callable[[dict, "aiohttp.ClientSession"], object] | None,
               timeout: float) -> list[dict]:
    client_id = uuid.uuid4().hex
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                r.raise_for_status()
                reply = await r.json()
                if reply.get("node_errors"):
                    raise RuntimeError(f"prompt failed validation: {json.dumps(reply['node_errors'])[:2000]}")
                prompt_id = reply["prompt_id"]
            async def receive():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    events.append(event)
                    if on_event:
                        result = on_event(event)
                        if asyncio.iscoroutine(result):
                            await result
                    if event["type"] in DONE and data.get("prompt_id") == prompt_id:
                        return
            await asyncio.wait_for(receive(), timeout)
    return events


def run_and_watch(server, prompt: dict, on_event=None, timeout: float = 600.0) -> list[dict]:
    """Queues ``prompt`` and returns every websocket event of it until it succeeds, fails or is
    interrupted. ``on_event(event)`` (sync or async) runs for each event as it arrives."""
    return asyncio.run(_run(server, prompt, on_event, timeout))


def post_interrupt(server) -> None:
    """POST /interrupt, as the browser's Cancel button does."""
    server.post_json("/interrupt", {})
