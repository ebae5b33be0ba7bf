"""Serve a zoo model over HTTP: many sessions at once, batched on the GPU (or CPU), audio streamed
out as it is generated. This is the command line (flags -> model -> Service -> app -> uvicorn);
the app is serving/app.py, each wire protocol a module of serving/protocols/, enabled by the card.

    python server.py --model mini-omni                 # http://127.0.0.1:60808
    python server.py --model mini-omni --tiny          # random tiny weights (noise), for tests

Routes
  POST /chat          {"audio": base64 audio file, "max_tokens": 100, ...the model's options}
                      -> chunked raw PCM s16le mono at the model's output rate (the Mini-Omni
                      reference clients' protocol); with "Accept: multipart/x-mixed-replace" or
                      "format": "multipart", Mini-Omni2-style parts alternating audio and text.
  WS   /v1/realtime   live sessions, OpenAI Realtime event protocol (subset: see serving/protocols/realtime.py)
  WS   /v1/duplex     full duplex (models whose card says duplex, e.g. hertz-dev): binary PCM16 LE
                      mono frames both ways at the card's input rate, each complete input frame
                      (card.frame_samples) answered by the model's next frame; JSON text for
                      session.created / session.update / errors (serving/protocols/duplex.py)
  WS   /audio         models whose card lists "data-url-live" (hertz-dev): the Hertz-dev reference
                      live protocol, text "data:audio/raw;base64,<int16>" frames of card.frame_samples
                      at the card's rate both ways (2000 at 16 kHz; its inference_client.py works
                      unchanged with --server ws://HOST:PORT; serving/protocols/hertz_reference.py)
  POST /set_temperature?token_temp=&categorical_temp=&gaussian_temp=   the same reference
                      client's knob: the default temperatures of /audio sessions opened afterwards
                      (never a running one), validated as model options (422 otherwise)
  WS   /api/chat      models whose card lists "kyutai-opus" (moshi): the Kyutai reference server's
                      protocol, binary messages of a kind byte + payload: 0x00 handshake, 0x01
                      Ogg/Opus audio both ways at the card's rate (24 kHz), 0x02 the model's text
                      pieces, 0x05 errors, as its moshi.client and web client speak it (URL
                      options text_temperature, text_topk, audio_temperature, audio_topk;
                      serving/protocols/kyutai_reference.py)
  GET  /v1/models     the loaded model's card
  GET  /health        liveness and free session slots
  GET  /metrics       Prometheus metrics

Security (serving/security.py): with --api-key (or OMNI_ZOO_API_KEY) every route but /health needs
"Authorization: Bearer <key>"; WebSockets from a foreign browser Origin are refused (--allow-origin
adds one); at most --max-connections requests at once; /chat takes application/json only; slow
or stalled clients are dropped after --read-timeout; SIGTERM closes sockets with a reason and cuts
replies after 10 s. Every error is a JSON error (or an error event) with a request id that is
also in the log and the X-Request-Id header, and is counted in zoo_errors_total{kind}. The log has
one line per request (serving/access_log.py). A port in use is one error line and exit status 2.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

import numpy as np

import zoo
from serving.app import create_app
from serving.http_input import READ_TIMEOUT_S
from serving.protocols.chat import MAX_BODY_BYTES
from serving.protocols.duplex import DuplexSettings
from serving.protocols.hertz_reference import ReferenceSettings
from serving.protocols.realtime import IDLE_TIMEOUT_S, MAX_WS_MESSAGE_BYTES
from serving.scale import cli as scale
from serving.security import MAX_CONNECTIONS, AccessSettings
from serving.service import Service
from serving.transport import PortUnavailable, bind, serve
from zoo.cli import add_model_flags, load_model, noise_notice
from zoo.core.admission import PREFILL_POSITIONS
from zoo.core.audio import read_audio

log = logging.getLogger("omni-zoo.server")


def warm_up(model: zoo.VoiceModel) -> None:
    """One short reply so the first client does not pay for lazy initialisation."""
    silence = np.zeros(model.card.input_sample_rate, np.float32)
    for _ in model.respond(silence, model.card.input_sample_rate, {"max_new_tokens": 12}):
        pass


def parse_args(argv=None) -> argparse.Namespace:
    """server.py's flags. ``--model a,b,...`` (several models, the Ray deployment only): ``models``
    lists them, ``model`` is the first (whose component flags the parser takes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    models, argv_one_model = scale.split_models(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    parser.add_argument("--port", type=int, default=60808)
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefill-batch", type=int, default=8,
                        help="new replies that join (one batched prefill) between two decode steps")
    parser.add_argument("--prefill-positions", type=int, default=PREFILL_POSITIONS,
                        help="prompt positions prefilled at most between two decode steps; a longer prompt "
                             "starts in parts, one per step (chunked prefill; 0: no bound)")
    security = parser.add_argument_group("security and limits (see README: Security)")
    security.add_argument("--api-key", default=os.environ.get("OMNI_ZOO_API_KEY"),
                          help="require 'Authorization: Bearer KEY' on every route but /health "
                               "(default: env OMNI_ZOO_API_KEY; unset: no key)")
    security.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                          help="a browser origin (e.g. https://chat.example.com) allowed to open WebSockets, "
                               "besides the server's own and loopback pages; repeatable")
    security.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                          help="open WebSockets and streaming replies at once; more are refused with 503")
    security.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                          help="seconds a client may stall while sending a request's headers or body")
    security.add_argument("--realtime-idle-s", type=float, default=IDLE_TIMEOUT_S,
                          help="close a /v1/realtime session after this long without a client event "
                               "(never while a reply is running)")
    duplex = parser.add_argument_group("full duplex (models whose card says duplex)")
    duplex.add_argument("--duplex-sessions", type=int,
                        help="duplex session slots, their caches allocated at start (default: --max-sessions)")
    duplex.add_argument("--duplex-prompt", help="an audio file that seeds every duplex session (as the "
                        "reference server's --prompt_path; stereo = user, model); a client may send its own")
    duplex.add_argument("--duplex-backlog", type=int, default=DuplexSettings.max_backlog_frames,
                        help="input frames a session may have waiting for the model; more are dropped with an error")
    duplex.add_argument("--duplex-idle-s", type=float, default=DuplexSettings.idle_timeout_s,
                        help="close a duplex session after this long without a message")
    duplex.add_argument("--duplex-max-s", type=float, default=DuplexSettings.max_session_s,
                        help="close a duplex session after this long in all (0: no limit)")
    duplex.add_argument("--replay-seconds", type=float, default=ReferenceSettings.replay_seconds,
                        help="/audio with a prompt: answer the first seconds with the prompt's end, as the reference")
    add_model_flags(parser, argv_one_model)
    scale.add_flags(parser)
    args = parser.parse_args(argv_one_model)
    args.models = models
    if args.prefill_batch < 1 or args.prefill_positions < 0:
        parser.error("--prefill-batch must be >= 1 and --prefill-positions >= 0 (0: no bound)")
    if len(models) > 1 and not scale.requested(argv):
        parser.error("several models in one address (--model a,b) run on Ray Serve: add --replicas (docs/SCALING.md)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if scale.requested(argv):  # many replicas, many models: serving/scale on Ray Serve
        return scale.main(argv, parse_args)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sock = bind(args.host, args.port)  # before minutes of loading: a busy port is said at once
    except PortUnavailable as err:
        log.error("%s", err)
        return 2
    try:
        return run(args, sock)
    except PortUnavailable as err:
        log.error("%s", err)
        return 2
    finally:
        sock.close()


def run(args: argparse.Namespace, sock) -> int:
    """Load the model, build the app and serve it on ``sock`` until stopped."""
    try:
        model = load_model(args, seed=args.seed)
    except zoo.ZooError as err:
        log.error("%s", err)
        return 2
    if model.random_weights:
        log.warning("%s", noise_notice(model))
    prompt = None
    if args.duplex_prompt:
        try:
            audio, rate = read_audio(args.duplex_prompt)
            prompt = np.asarray(audio, np.float32), rate
        except zoo.ZooError as err:
            log.error("--duplex-prompt: %s", err)
            return 2
    warm_up(model)
    try:
        service = Service(model, args.max_sessions, duplex_sessions=args.duplex_sessions, duplex_prompt=prompt,
                          prefill_batch=args.prefill_batch, prefill_positions=args.prefill_positions or None)
    except zoo.ZooError as err:  # e.g. a --duplex-prompt the model refuses
        log.error("%s", err)
        return 2
    if service.duplex is not None:
        log.info("full duplex: %d session slots (%.1f MiB of caches)",
                 service.duplex.max_sessions, service.duplex.nbytes() / 2**20)
    settings = DuplexSettings(max_backlog_frames=args.duplex_backlog, idle_timeout_s=args.duplex_idle_s,
                              max_session_s=args.duplex_max_s)
    access = AccessSettings(api_key=args.api_key or None, allowed_origins=tuple(args.allow_origin),
                            max_connections=args.max_connections)
    if access.api_key is None and not is_loopback(args.host):
        log.warning("--host %s is reachable from other machines and no --api-key is set: anyone who can "
                    "reach it can use the model", args.host)
    app = create_app(service, int(args.max_body_mb * 2**20), settings, access, read_timeout=args.read_timeout,
                     realtime_idle_s=args.realtime_idle_s,
                     reference_settings=ReferenceSettings(replay_seconds=args.replay_seconds))

    def started() -> None:
        log.info("serving %s on http://%s:%d (max %d sessions)", model.card.name, url_host(args.host), args.port,
                 args.max_sessions)

    serve(app, app.state.open_sockets, sock=sock, read_timeout=args.read_timeout, ws_max_size=MAX_WS_MESSAGE_BYTES,
          on_started=started)
    return 0


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


if __name__ == "__main__":
    raise SystemExit(main())
