"""
Talk to a model in the browser: a FastAPI app that serves a one-file page (nanochat/ui.html)
and a streaming completion endpoint.

    python -m scripts.chat_web                      # the latest SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web -i base -p 8080 --host 0.0.0.0 --allow-host mybox.lan   # other machines: http://mybox.lan:8080
    python -m scripts.chat_web --megacontext        # conversations of any length, through a MegaContext
    python -m scripts.chat_web --gist-first         # MegaContext with gist-first decoding
    python -m scripts.chat_web --ck ~/ck/docs       # a Core-Knowledge memory attached (scripts/mc_build_ck.py)

Endpoints:
    GET  /                  the chat page
    GET  /health            {"status": "ok"}
    POST /chat/completions  {"messages": [{"role", "content"}, ...], "temperature"?, "top_k"?, "max_tokens"?}
                            -> text/event-stream: `data: {"token": "..."}` per decoded piece (a calculator
                               call shows as "[calc: 12*3 = 36]"), `data: {"message": content}` (the reply as
                               the history should send it back: a string, or text / python / python_output
                               parts when it used the calculator), then `data: {"done": true}`. A bad request
                               gets HTTP 400 {"detail": "..."}, a body over MAX_BODY_BYTES 413. A reply stops
                               at MAX_MESSAGE_CHARS (the page sends it back with the next request); a plain
                               conversation may take as many tokens as the model reads (its rotary table, as
                               chat_cli).
With --megacontext each request's conversation is fed into a fresh runtime Session
(nanochat/megacontext/runtime.py): no context-length limit (only the character limits below), and
before "done" one `data: {"focus": {...}}` event reports the working context (LOD mix, budget use).
--ck PATH (repeatable, implies --megacontext) attaches Core-Knowledge memories to every session: they
are read into RAM once and shared, and the focus event gives each memory's part of the WC.
"""

import os
import sys
import json
import random
import argparse
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

import nanochat
from nanochat.common import cli_main, compute_init, autodetect_device_type
from nanochat.engine import TEMPERATURE_MAX, temperature_problem

# Request limits: one browser tab talking to a small model, not a batch API.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 16 * MAX_TOTAL_CHARS + 65536  # a body past this is refused before it is read whole (JSON escapes: <= 12 bytes a char)
ASSISTANT_PARTS = ("text", "python", "python_output")  # an assistant message's content parts (tokenizer.parse_assistant)
TEMPERATURE_RANGE = (0.0, TEMPERATURE_MAX)  # and 0 or at least engine.TEMPERATURE_MIN
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the Host / Origin a request may name, unless --allow-host widens it
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)

UI_PATH = os.path.join(os.path.dirname(os.path.abspath(nanochat.__file__)), "ui.html")


def _number(body, name, default, lo, hi, integer):
    """body[name] (or the default) checked to be a number in [lo, hi]; bools are not numbers."""
    value = body.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def is_parts(content):
    """An assistant reply that used the calculator, as the "message" event gives it back: a non-empty list of parts."""
    return isinstance(content, list) and 0 < len(content) <= MAX_MESSAGES and all(
        isinstance(part, dict) and set(part) == {"type", "text"} and part["type"] in ASSISTANT_PARTS
        and isinstance(part["text"], str) for part in content)


def validate_request(body, defaults):
    """JSON body -> (messages, temperature, top_k, max_tokens); ValueError with a message a user
    can act on. Roles: an optional system message first, then user/assistant alternating,
    starting and ending with user (the reply is the next assistant turn)."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of {role, content} objects")
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"too many messages: {len(messages)} > {MAX_MESSAGES}")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or (m["role"] == "assistant" and is_parts(m.get("content")))):
            raise ValueError(f"message {i} must be an object with string role and content (an assistant's content may be "
                             f"a list of {{type: {' / '.join(ASSISTANT_PARTS)}, text}} parts)")
        chars = len(m["content"]) if isinstance(m["content"], str) else sum(len(part["text"]) for part in m["content"])
        if chars > MAX_MESSAGE_CHARS:
            raise ValueError(f"message {i} is too long: {chars} > {MAX_MESSAGE_CHARS} characters")
        total += chars
    if total > MAX_TOTAL_CHARS:
        raise ValueError(f"conversation is too long: {total} > {MAX_TOTAL_CHARS} characters in all")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("a system message must be followed by a user message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            index = i + len(messages) - len(turns)
            raise ValueError(f"message {index} has role {m['role']!r}, expected {expected!r} "
                             "(an optional system message first, then user/assistant alternating, starting with user)")
    if turns[-1]["role"] != "user":
        raise ValueError("the last message must be from the user")
    temperature = _number(body, "temperature", defaults["temperature"], *TEMPERATURE_RANGE, integer=False)
    if temperature_problem(temperature):
        raise ValueError(temperature_problem(temperature))
    top_k = _number(body, "top_k", defaults["top_k"], *TOP_K_RANGE, integer=True)
    max_tokens = _number(body, "max_tokens", defaults["max_tokens"], *MAX_TOKENS_RANGE, integer=True)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # drop any extra keys
    return messages, float(temperature), top_k, max_tokens


TOOL_DISPLAY = {"<|python_start|>": "[calc: ", "<|python_end|>": "", "<|output_start|>": " = ", "<|output_end|>": "]"}


def stream_text(tokens, tokenizer):
    """Token ids -> text pieces. Decodes the tokens so far and yields only the new text once it
    ends in a complete character (a multi-byte character can span tokens; until its last byte
    arrives the decode ends in U+FFFD). Whatever is left is flushed at the end. Calculator
    markers show as "[calc: 12*3 = 36]" rather than raw special tokens."""
    display = {tokenizer.encode_special(k): v for k, v in TOOL_DISPLAY.items()}
    generated, sent = [], ""
    for token in tokens:
        generated.append(token)
        text = _decode_for_display(generated, tokenizer, display)
        if not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = _decode_for_display(generated, tokenizer, display)
    if len(text) > len(sent):
        yield text[len(sent):]


def _decode_for_display(tokens, tokenizer, display):
    """Decode runs of ordinary tokens together (multi-byte characters span tokens), markers by the table."""
    out, run = [], []
    for t in tokens:
        if t in display:
            out += [tokenizer.decode(run), display[t]]
            run = []
        else:
            run.append(t)
    return "".join(out) + tokenizer.decode(run)


def sse(obj):
    return f"data: {json.dumps(obj)}\n\n"


def request_refusal(headers, allowed_hosts):
    """Why a request may not be served (None: it may): its Host, and its Origin when a browser sends
    one, must name an allowed host, so a web page elsewhere (or a DNS-rebinding name) cannot drive
    the local server. allowed_hosts: hostnames as a user types them ("MyBox.lan", "[::1]"); "*" allows any."""
    if "*" in allowed_hosts:
        return None
    allowed_hosts = {h.strip("[]").lower() for h in allowed_hosts}  # as urlsplit gives them: lowercase, no brackets
    try:
        host = urlsplit("//" + headers.get("host", "")).hostname
    except ValueError:  # e.g. "[" (an unclosed IPv6 bracket)
        return f"host {headers.get('host', '')!r} is not a host name"
    if host not in allowed_hosts:
        return f"host {headers.get('host', '')!r} is not served here (start with --allow-host to serve it)"
    origin = headers.get("origin")
    try:
        origin_host = None if origin is None else urlsplit(origin).hostname
    except ValueError:
        return f"origin {origin!r} is not a URL"
    if origin is not None and origin_host not in allowed_hosts:
        return f"requests from origin {origin!r} are not accepted (start with --allow-host to accept them)"
    return None


def create_app(engine, tokenizer, defaults, new_session=None, allowed_hosts=LOCAL_HOSTS):
    """The web app around one Engine. defaults: {"temperature", "top_k", "max_tokens"} used when
    a request leaves them out. Generation runs in the server's thread pool (a sync generator),
    so a slow model does not block other requests; each request has its own KV cache.
    new_session(seed) -> a MegaContext runtime Session: when given, every request decodes through
    a fresh one instead of the engine (no context limit). allowed_hosts: request_refusal."""
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()
    context = engine.model.cos.size(1)  # the rotary table: the most positions the model can read, as chat_cli's limit
    app = FastAPI(title="nanochat")

    @app.middleware("http")
    async def only_allowed_hosts(request, call_next):
        refusal = request_refusal(request.headers, allowed_hosts)
        if refusal is not None:
            return JSONResponse({"detail": refusal}, status_code=403)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPException(status_code=415, detail="send the request as application/json")
        too_big = HTTPException(status_code=413, detail=f"request body over {MAX_BODY_BYTES:,} bytes")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        try:
            raw = bytearray()
            async for chunk in request.stream():  # counted as it comes: a chunked body has no length to check first
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise too_big
            body = json.loads(bytes(raw))
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
            raise HTTPException(status_code=400, detail="request body is not valid JSON (or is nested too deeply)")
        except ClientDisconnect:  # the client left before sending the whole body: no one to answer, nothing to log
            return Response(status_code=400)
        try:
            messages, temperature, top_k, max_tokens = validate_request(body, defaults)
            prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e))
        if new_session is None and len(prompt) >= context:
            raise HTTPException(status_code=400, detail=f"conversation is too long: {len(prompt)} tokens, "
                                                        f"the model reads at most {context:,}; start a new chat, "
                                                        "or serve with --megacontext (no length limit)")
        seed = random.randrange(2**31)  # a different reply each time, like the CLI with a fresh seed
        session, generated = None, []

        def reply_tokens():
            nonlocal session
            if new_session is not None:
                session = new_session(seed)
                session.feed(prompt)
                stream = ((token, None) for token, _ in session.generate(max_tokens, temperature, top_k, tools=engine.tools))
            else:
                stream = ((column[0], None) for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                                                             temperature=temperature, top_k=top_k, seed=seed))
            chars = 0  # the reply's characters, bounded above (each token decoded alone counts at least its share)
            for token, _ in stream:
                if token in engine.stop_tokens:  # <|assistant_end|> (or <|bos|>)
                    return
                chars += len(tokenizer.decode([token]))
                if chars > MAX_MESSAGE_CHARS:  # the next request sends this reply back: never one that would be refused
                    return
                generated.append(token)
                yield token

        def events():
            try:
                for piece in stream_text(reply_tokens(), tokenizer):
                    yield sse({"token": piece})
                yield sse({"message": tokenizer.parse_assistant(generated)})  # what the next request's history holds
                if session is not None:
                    yield sse({"focus": session.focus()})
            except Exception as e:  # the status line is already sent: report in the stream
                yield sse({"error": f"generation failed: {e}"})
            yield sse({"done": True})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def megacontext_sessions(args, model, model_tag, step, device):
    """--megacontext / --gist-first / --ck: new_session(seed) for create_app, a fresh runtime Session per
    request with the --ck memories attached (read once here and shared; they are only read)."""
    from nanochat.megacontext.checkpoint import chat_model_name, load_for_chat
    from nanochat.megacontext.runtime import Session
    mc, gistnet, lensnet, predictor = load_for_chat(args.source, model_tag, step, model, device)
    name = chat_model_name(args.source, model_tag, step)  # the model Core-Knowledge trees are built for (mc_build_ck)

    def new_session(seed):
        session = Session.create(model, gistnet, lensnet, mc, predictor=predictor, w_max=args.w_max,
                                 gist_first=args.gist_first, seed=seed, model_name=name)
        for path, tree in zip(args.ck, trees):
            session.attach(path, tree=tree)
        return session

    probe = Session.create(model, gistnet, lensnet, mc, predictor=predictor, w_max=args.w_max, gist_first=args.gist_first,
                           model_name=name)  # bad settings fail now, not per request
    trees = [probe.load_memory(path) for path in args.ck]
    return new_session


def main():
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the browser", allow_abbrev=False)
    p.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="which checkpoints to load")
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-p", "--port", type=int, default=8000)
    p.add_argument("--host", type=str, default="127.0.0.1", help="the address to listen on: 0.0.0.0 listens on every "
                   "interface, and other machines' requests then need --allow-host with the name they use (or '*')")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default when a request gives none")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default when a request gives none")
    p.add_argument("--max-tokens", type=int, default=512, help="default when a request gives none")
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--megacontext", action="store_true", help="decode through a MegaContext: conversations of any length")
    p.add_argument("--gist-first", action="store_true", help="MegaContext with gist-first decoding (needs a --megaprediction run)")
    p.add_argument("--w-max", type=int, default=None, help="MegaContext working-context budget (default: the run's mc_w_max)")
    p.add_argument("--ck", type=str, action="append", default=[], help="attach a Core-Knowledge memory built by "
                   "scripts.mc_build_ck to every session (repeatable; implies --megacontext)")
    p.add_argument("--allow-host", type=str, action="append", default=[], help="a hostname requests may name in their Host / "
                   "Origin besides localhost (repeatable; '*': any). --host NAME allows NAME")
    args = p.parse_args()
    if temperature_problem(args.temperature):
        p.error(temperature_problem(args.temperature))
    if not TOP_K_RANGE[0] <= args.top_k <= TOP_K_RANGE[1]:
        p.error(f"top-k must be in {list(TOP_K_RANGE)}")
    if not MAX_TOKENS_RANGE[0] <= args.max_tokens <= MAX_TOKENS_RANGE[1]:
        p.error(f"max-tokens must be in {list(MAX_TOKENS_RANGE)}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    if args.w_max is not None and not (args.megacontext or args.gist_first or args.ck):
        p.error("--w-max needs --megacontext")

    import uvicorn
    from nanochat.engine import Engine
    from nanochat.checkpoint_manager import load_model, resolve_checkpoint
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    _, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    new_session = megacontext_sessions(args, model, model_tag, step, device) if args.megacontext or args.gist_first or args.ck else None
    wildcard = args.host in ("0.0.0.0", "::", "")
    allowed = LOCAL_HOSTS + tuple(args.allow_host) + (() if wildcard else (args.host,))
    app = create_app(Engine(model, tokenizer), tokenizer, defaults, new_session, allowed_hosts=allowed)
    print(f"nanochat web chat on http://{'127.0.0.1' if wildcard else args.host}:{args.port}/")
    if wildcard and not args.allow_host:
        print(f"listening on every interface ({args.host}), but requests naming another host are refused: "
              "add --allow-host <the name or address they use> (or '*')")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    cli_main(main)
