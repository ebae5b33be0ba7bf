"""A stand-in voice server for the web UI tests: several models in ``GET /v1/models`` (as a
multi-model deployment lists them) and a ``/v1/realtime`` socket whose replies the test scripts
turn by turn (``replies``: "ok" or "busy"), recording the model each session asked for, the API
key it offered, the host it was addressed to and the images it sent (conversation.item.create's
input_image URLs; a model is ``(name, text_output)`` or ``(name, text_output, image_input)``). uvicorn on a free loopback port in a thread."""
from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from procs import free_port

KEY_PROTOCOL = "openai-insecure-api-key."


def _model(model_id: str, text_output: bool, image_input: bool = False) -> dict:
    card = {"name": model_id, "title": model_id.title(), "input_sample_rate": 16000, "output_sample_rate": 24000,
            "max_input_seconds": 30.0, "text_output": text_output, "duplex": False, "multi_turn": False,
            "image_input": image_input}
    return {"id": model_id, "object": "model", "random_weights": False, "notice": None,
            "default_max_new_tokens": None, "card": card}


class RealtimeStub:
    def __init__(self, models: list[tuple], api_key: str) -> None:
        self.models = [_model(*model) for model in models]
        self.api_key = api_key
        self.replies: list[str] = []  # what the next turns get, in order
        self.sessions: list[dict] = []  # per socket: the model asked for and the key offered
        self.app = self._app()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the stub server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models(request: Request):
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"type": "unauthorized", "message": "API key needed"}}, 401)
            return {"object": "list", "data": self.models}

        @app.websocket("/v1/realtime")
        async def realtime(ws: WebSocket):
            offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
            key = next((p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), None)
            session = {"model": ws.query_params.get("model"), "key": key, "host": ws.headers.get("host"), "images": []}
            self.sessions.append(session)
            if key != self.api_key:
                await ws.close(code=1008)
                return
            await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
            model = ws.query_params.get("model")
            await ws.send_json({"type": "session.created", "session": {"model": model}})
            try:
                while True:
                    event = await ws.receive_json()
                    if event["type"] == "conversation.item.create":
                        session["images"] += [part["image_url"] for part in event["item"]["content"]]
                    if event["type"] == "response.create":
                        await self._reply(ws, self.replies.pop(0) if self.replies else "ok")
            except WebSocketDisconnect:  # the page closes the socket once the reply has ended
                pass

        return app

    async def _reply(self, ws: WebSocket, how: str) -> None:
        if how == "busy":
            await ws.send_json({"type": "error", "error": {"type": "server_error", "code": "busy",
                                                           "message": "all 1 session slots are busy"}})
            await ws.send_json({"type": "response.done", "response": {
                "status": "failed", "status_details": {"type": "failed", "reason": "busy"}}})
            return
        await ws.send_json({"type": "response.created", "response": {"status": "in_progress"}})
        tone = (0.3 * np.sin(np.arange(24000) * 2 * np.pi * 220 / 24000) * 32767).astype("<i2")
        for piece in np.array_split(tone, 4):  # 1 s of audio in four chunks
            await ws.send_json({"type": "response.output_audio.delta", "delta": base64.b64encode(piece.tobytes()).decode()})
            await asyncio.sleep(0.05)
        await ws.send_json({"type": "response.done", "response": {"status": "completed", "status_details": None}})
