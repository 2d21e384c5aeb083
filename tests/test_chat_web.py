"""
The web chat: the page, the streaming endpoint and its request limits through FastAPI's test
client, and the page in a real headless Chromium against a uvicorn server on 127.0.0.1.
A tiny real GPT (random weights) and a tokenizer trained here; greedy decoding (temperature 0)
keeps every reply deterministic.
"""

import json
import sys
import shutil
import socket
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine
from nanochat.tokenizer import RustBPETokenizer
from scripts.chat_web import create_app, stream_text, validate_request, MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS, MAX_BODY_BYTES

LOCAL = "http://127.0.0.1:8000"  # what a browser on this machine sends as Host

DEFAULTS = {"temperature": 0.0, "top_k": 50, "max_tokens": 24}
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def tokenizer():
    text = "hello there, how are you today? I am a small model. The cat sat on the mat. 0123456789 " * 40
    return RustBPETokenizer.train_from_iterator(iter([text]), 400)


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64, window_pattern="L"))
    model.init_weights()
    model.eval()
    return Engine(model, tokenizer)


@pytest.fixture(scope="module")
def client(engine, tokenizer):
    return TestClient(create_app(engine, tokenizer, DEFAULTS), base_url=LOCAL)


def greedy_reply(engine, tokenizer, messages, max_tokens):
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0)
    return tokenizer.decode(results[0][len(prompt):])


def sse_events(text):
    """Parse a text/event-stream body: blank-line separated `data: <json>` events."""
    chunks = [c for c in text.split("\n\n") if c]
    assert text.endswith("\n\n")
    assert all(c.startswith("data: ") and "\n" not in c for c in chunks), text
    return [json.loads(c[len("data: "):]) for c in chunks]


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ['id="messages"', 'id="input"', 'id="send"', 'id="new-chat"', "/chat/completions"]:
        assert needle in html
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_streaming_completion_matches_engine(client, engine, tokenizer):
    messages = HELLO + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you"}]
    r = client.post("/chat/completions", json={"messages": messages, "max_tokens": 16})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == {"done": True}
    pieces = [e["token"] for e in events[:-2]]
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == greedy_reply(engine, tokenizer, messages, max_tokens=16)
    assert events[-2] == {"message": "".join(pieces)}  # no calculator call: the history holds the text as shown


def test_request_defaults_and_system_message(client, engine, tokenizer):
    """No sampling fields: the server's defaults (greedy, 24 tokens). A system message first is allowed."""
    messages = [{"role": "system", "content": "be brief"}] + HELLO
    events = sse_events(client.post("/chat/completions", json={"messages": messages}).text)
    assert events[-1] == {"done": True}
    assert "".join(e["token"] for e in events[:-2]) == greedy_reply(engine, tokenizer, messages, max_tokens=24)


def test_stream_text_emits_only_complete_characters(tokenizer):
    text = "héllo 😀 wörld ✓"
    ids = tokenizer.encode(text)  # the tokenizer saw no such characters: they split into byte tokens
    assert len(ids) > len(text.split())
    pieces = list(stream_text(iter(ids), tokenizer))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "😀" in pieces or any(p.endswith("😀") for p in pieces)


def test_stream_text_flushes_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # cut the emoji's last byte off
    assert "".join(stream_text(iter(ids), tokenizer)) == tokenizer.decode(ids)


def _msgs(n):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]


BAD_REQUESTS = [
    ({"messages": []}, "messages is empty"),
    ({}, "messages must be a list"),
    ({"messages": "hello"}, "messages must be a list"),
    ({"messages": _msgs(MAX_MESSAGES + 1)}, f"too many messages: {MAX_MESSAGES + 1} > {MAX_MESSAGES}"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "message 0 is too long"),
    ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 7000} for i in range(5)]},
     f"conversation is too long: 35000 > {MAX_TOTAL_CHARS} characters"),
    ({"messages": [{"role": "user", "content": 5}]}, "message 0 must be an object with string role and content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "message 0 has role 'assistant', expected 'user'"),
    ({"messages": HELLO + HELLO}, "message 1 has role 'user', expected 'assistant'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "s"}]}, "message 1 has role 'system'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "a system message must be followed by a user message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 has role 'bot'"),
    ({"messages": _msgs(2)}, "the last message must be from the user"),
    ({"messages": HELLO, "temperature": 2.5}, "temperature must be in [0.0, 2.0], got 2.5"),
    ({"messages": HELLO, "temperature": -0.1}, "temperature must be in [0.0, 2.0]"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": HELLO, "temperature": 1e-300}, "temperature must be 0 (greedy) or in [0.01, 2]"),
    ({"messages": HELLO, "temperature": 1e-45}, "temperature must be 0 (greedy) or in [0.01, 2]"),
    ({"messages": HELLO, "max_tokens": 10 ** 400}, "max_tokens must be in [1, 4096]"),
    ({"messages": HELLO, "top_k": 0}, "top_k must be in [1, 200], got 0"),
    ({"messages": HELLO, "top_k": 201}, "top_k must be in [1, 200], got 201"),
    ({"messages": HELLO, "top_k": 5.5}, "top_k must be an integer"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens must be in [1, 4096], got 0"),
    ({"messages": HELLO, "max_tokens": 4097}, "max_tokens must be in [1, 4096], got 4097"),
    ({"messages": HELLO, "max_tokens": True}, "max_tokens must be an integer"),
    ([1, 2], "request body must be a JSON object"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS)
def test_request_limits_give_400(client, body, message):
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 400
    assert message in r.json()["detail"]


def test_invalid_json_gives_400(client):
    r = client.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  b'{"messages": [{"role": "user", "content": "\\ud800 odd \\udfff"}]}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "top_k": ' + b"9" * 5000 + b"}"])
def test_no_request_gets_a_500(client, body):
    """Nesting past the parser, lone surrogates, numbers out of every range: a 400, or a reply."""
    r = client.post("/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), (r.status_code, r.text[:200])


def test_only_json_from_allowed_hosts_is_served(client, engine, tokenizer):
    """A page elsewhere can post text/plain JSON without a preflight, or reach the server through a
    rebinding name: both refused. A flag widens the hosts."""
    body = json.dumps({"messages": HELLO, "max_tokens": 2})
    r = client.post("/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/chat/completions", content=body, headers={"content-type": "application/json", "origin": "https://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["detail"]
    assert TestClient(client.app, base_url="http://rebound.example").get("/").status_code == 403
    ok = client.post("/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8",
                                                                  "origin": "http://localhost:8000"})
    assert ok.status_code == 200
    wide = TestClient(create_app(engine, tokenizer, DEFAULTS, allowed_hosts=("lab.example",)), base_url="http://lab.example")
    assert wide.get("/health").status_code == 200
    # names as a user types them: any case, an IPv6 address in brackets (urlsplit gives lowercase, no brackets)
    from scripts.chat_web import request_refusal
    for typed, header in (("MyBox.lan", "MyBox.lan:8000"), ("mybox.lan", "MYBOX.LAN"), ("[fe80::1]", "[fe80::1]:8000")):
        assert request_refusal({"host": header}, (typed,)) is None
        assert request_refusal({"host": header, "origin": f"http://{header}"}, (typed,)) is None
    assert request_refusal({"host": "other.lan"}, ("MyBox.lan",)) is not None


def test_a_soak_of_valid_and_invalid_requests_leaves_the_server_answering(client):
    """40 requests from 8 threads, a quarter valid, the rest of every bad kind: each gets 200 or 4xx, never 5xx."""
    from concurrent.futures import ThreadPoolExecutor
    bodies = [json.dumps({"messages": HELLO, "max_tokens": 3}).encode()] + [json.dumps(b).encode() for b, _ in BAD_REQUESTS[:9]] + \
        [b"{", b"[" * 5000, b"null", b'"\\ud800"']
    jobs = [bodies[i % len(bodies)] for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: client.post("/chat/completions", content=b, headers={"content-type": "application/json"}).status_code, jobs))
    assert all(c == 200 or 400 <= c < 500 for c in codes) and 200 in codes
    assert client.get("/health").json() == {"status": "ok"}


def test_prompt_longer_than_context_gives_400(client, tokenizer):
    # under every character limit, but more tokens than the model reads: its rotary table (10 x its 256-token
    # sequence_len), the limit chat_cli uses too (this one stopped at 256 where the CLI went on)
    words = " ".join(f"q{i}" for i in range(1300))
    r = client.post("/chat/completions", json={"messages": [{"role": "user", "content": words}]})
    assert r.status_code == 400 and "the model reads at most 2,560" in r.json()["detail"]
    words = " ".join(f"q{i}" for i in range(150))  # > 256 tokens: answered
    assert len(tokenizer.encode(words)) > 256
    r = client.post("/chat/completions", json={"messages": [{"role": "user", "content": words}], "max_tokens": 2})
    assert r.status_code == 200 and "done" in r.text


def test_limits_at_the_edges_are_accepted(client):
    body = {"messages": HELLO, "temperature": 2, "top_k": 200, "max_tokens": 1}
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 200 and sse_events(r.text)[-1] == {"done": True}
    # exactly MAX_MESSAGES (a system message, then user ... user) passes the count check, and the
    # conversation's tokens fit what the model reads (its rotary table)
    messages = [{"role": "system", "content": "s"}] + _msgs(MAX_MESSAGES - 1)
    r = client.post("/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 200 and sse_events(r.text)[-1] == {"done": True}


# -----------------------------------------------------------------------------
# The page in a real browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def live_server(engine, tokenizer):
    """uvicorn on a socket bound here to 127.0.0.1, port 0: the port is known before the server
    thread starts, and connections made before it accepts wait in the listen backlog."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, DEFAULTS), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def test_clients_that_leave_mid_body_or_mid_stream_log_nothing_and_the_server_answers(live_server):
    import struct
    import logging
    import urllib.request
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)  # where uvicorn logs an app's exceptions
    host, port = live_server.removeprefix("http://").split(":")
    body = json.dumps({"messages": HELLO, "max_tokens": 24}).encode()

    def post(length):
        c = socket.create_connection((host, int(port)), timeout=30)
        c.sendall(f"POST /chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode() + body)
        return c

    def reset(c):  # leave abruptly (RST), as a closed browser tab can
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    for _ in range(3):
        c = post(len(body))
        assert c.recv(12) == b"HTTP/1.1 200"  # the stream has started
        reset(c)
    c = post(len(body) + 50)  # 50 body bytes never come
    threading.Event().wait(0.5)
    reset(c)
    threading.Event().wait(1.0)
    with urllib.request.urlopen(f"{live_server}/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not records, [r.getMessage() + str(r.exc_info and r.exc_info[1].__class__) for r in records]


def test_browser_streams_a_reply(live_server, engine, tokenizer, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (runtests.sh installs it with apt-get when run as root)")
    from playwright.sync_api import sync_playwright
    expected = greedy_reply(engine, tokenizer, HELLO, max_tokens=DEFAULTS["max_tokens"])
    assert expected.strip(), "the tiny model's greedy reply is empty: pick another seed"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.fill("#input", HELLO[0]["content"])
            page.click("#send")
            page.wait_for_selector(".message.user")
            # done when the bubble stops streaming; it must hold the streamed tokens
            page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
            assert page.inner_text(".message.user") == HELLO[0]["content"]
            bubble = page.locator(".message.assistant")
            assert bubble.count() == 1 and "error" not in bubble.get_attribute("class")
            assert bubble.evaluate("el => el.textContent") == expected
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            # the page keeps the conversation: a second turn sends both earlier messages
            with page.expect_request("**/chat/completions") as request:
                page.fill("#input", "how are you")
                page.press("#input", "Enter")
            sent = json.loads(request.value.post_data)["messages"]
            assert sent == HELLO + [{"role": "assistant", "content": expected}, {"role": "user", "content": "how are you"}]
            page.wait_for_function("document.querySelectorAll('.message.assistant:not(.streaming)').length == 2",
                                   timeout=60_000)
            # new chat clears the page and the conversation
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
            with page.expect_request("**/chat/completions") as request:
                page.fill("#input", "again")
                page.click("#send")
            assert json.loads(request.value.post_data)["messages"] == [{"role": "user", "content": "again"}]
            page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)
        finally:
            browser.close()


def test_stream_text_shows_calculator_calls_readably(tokenizer):
    sp = tokenizer.encode_special
    ids = (tokenizer.encode("so ") + [sp("<|python_start|>")] + tokenizer.encode("12*3") + [sp("<|python_end|>")]
           + [sp("<|output_start|>")] + tokenizer.encode("36") + [sp("<|output_end|>")] + tokenizer.encode(" done"))
    assert "".join(stream_text(iter(ids), tokenizer)) == "so [calc: 12*3 = 36] done"


class FakeModel:  # what create_app reads of a model: its rotary table's length
    cos = torch.empty(1, 2560, 1, 1)


def test_a_reply_that_used_the_calculator_goes_back_into_the_history_as_its_tokens(tokenizer):
    """The page stored the shown text, "[calc: 12*3 = 36]36", as the assistant turn, so the next prompt held that
    literal text instead of the tool tokens the model wrote (and the server refused content as parts)."""
    sp = tokenizer.encode_special
    reply = (tokenizer.encode("so ") + [sp("<|python_start|>")] + tokenizer.encode("12*3") + [sp("<|python_end|>")]
             + [sp("<|output_start|>")] + tokenizer.encode("36") + [sp("<|output_end|>")] + tokenizer.encode(" done"))

    class Scripted:  # an engine whose one reply is the calculator call above
        model, stop_tokens, tools = FakeModel(), {sp("<|assistant_end|>")}, None

        def generate(self, prompt, **kwargs):
            for t in reply + [sp("<|assistant_end|>")]:
                yield [t], [1]
    client = TestClient(create_app(Scripted(), tokenizer, DEFAULTS), base_url=LOCAL)
    events = sse_events(client.post("/chat/completions", json={"messages": HELLO}).text)
    assert "".join(e["token"] for e in events if "token" in e) == "so [calc: 12*3 = 36] done"
    message = events[-2]["message"]
    assert [p["type"] for p in message] == ["text", "python", "python_output", "text"]
    history = HELLO + [{"role": "assistant", "content": message}, {"role": "user", "content": "and 4*4?"}]
    r = client.post("/chat/completions", json={"messages": history})
    assert r.status_code == 200, r.text
    ids, _ = tokenizer.render_conversation({"messages": history[:2]})
    assert ids[-len(reply) - 1:-1] == reply  # it renders back to the very tokens the model wrote
    bad = HELLO + [{"role": "assistant", "content": [{"type": "shell", "text": "ls"}]}, {"role": "user", "content": "hi"}]
    assert client.post("/chat/completions", json={"messages": bad}).status_code == 400


def test_a_reply_stops_at_the_longest_message_a_request_may_send_back(tokenizer):
    """A reply of 4,096 tokens ran to ~22,000 characters, and the page's next request, which sends it back,
    was refused (message too long) until a new chat: the reply now stops at MAX_MESSAGE_CHARS."""
    word = [max(tokenizer.encode("hello there, how are you today? I am a small model."), key=lambda t: len(tokenizer.decode([t])))]

    class Endless:  # an engine that never ends its reply
        model, stop_tokens, tools = FakeModel(), {tokenizer.encode_special("<|assistant_end|>")}, None

        def generate(self, prompt, max_tokens=None, **kwargs):
            for i in range(max_tokens):
                yield [word[i % len(word)]], [1]
    client = TestClient(create_app(Endless(), tokenizer, DEFAULTS), base_url=LOCAL)
    events = sse_events(client.post("/chat/completions", json={"messages": HELLO, "max_tokens": 4096}).text)
    message = events[-2]["message"]
    chars = sum(len(part["text"]) for part in message) if isinstance(message, list) else len(message)
    assert MAX_MESSAGE_CHARS - 20 < chars <= MAX_MESSAGE_CHARS
    history = HELLO + [{"role": "assistant", "content": message}, {"role": "user", "content": "go on"}]
    validate_request({"messages": history}, DEFAULTS)  # accepted back (the tiny model's context is another matter)


def test_malformed_hosts_and_oversized_bodies_are_refused_not_a_500(client):
    for headers in ({"host": "["}, {"host": "[::1"}, {"origin": "http://["}):  # urlsplit raised: a 500 on every route
        assert client.get("/health", headers=headers).status_code == 403
    big = b'{"messages": [{"role": "user", "content": "hi"}], "pad": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}'
    r = client.post("/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413  # it was read and parsed whole, whatever its size
    chunked = client.post("/chat/completions", content=iter([big[:100_000], big[100_000:]]), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_megacontext_switch_streams_past_the_context_and_reports_focus(engine, tokenizer):
    """--megacontext: a conversation longer than the model's 256-token context is answered through a
    fresh runtime Session per request, the same greedy reply as a session driven directly."""
    from nanochat.megacontext.checkpoint import build_modules
    from nanochat.megacontext.config import MegaContextConfig
    from nanochat.megacontext.runtime import Session
    model = engine.model
    mc = MegaContextConfig(w_max=96, max_level=1, recent_tokens=16, gist_kind="mlp", gist_pooling="mean", lens_layers=1,
                           lens_hidden=32).validate()
    gistnet, lensnet = build_modules(mc, model.config)

    def new_session(seed):
        return Session.create(model, gistnet, lensnet, mc, seed=seed)

    client = TestClient(create_app(engine, tokenizer, DEFAULTS, new_session), base_url=LOCAL)
    words = " ".join(f"q{i}" for i in range(600))  # refused by the vanilla app (test above)
    messages = [{"role": "user", "content": words}]
    r = client.post("/chat/completions", json={"messages": messages})
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == {"done": True} and "focus" in events[-2]
    focus = events[-2]["focus"]
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    assert len(prompt) > 256 and focus["history_tokens"] > len(prompt) and focus["wc_cost"] <= 96
    direct = new_session(0)
    direct.feed(prompt)
    reply = []
    for token, _ in direct.generate(DEFAULTS["max_tokens"], temperature=0.0, tools=engine.tools):
        if token in engine.stop_tokens:
            break
        reply.append(token)
    assert "".join(e["token"] for e in events if "token" in e) == "".join(stream_text(reply, tokenizer))


def test_ck_memories_are_attached_to_every_request(base_dir, tmp_path):
    """--ck: main's session factory loads the memory once and every request's session reads it
    (the focus event gives its part of the working context)."""
    import argparse
    from conftest import save_mc_checkpoint
    from scripts import mc_build_ck
    from scripts.chat_web import megacontext_sessions
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    save_mc_checkpoint(base_dir, "web_ck")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the lighthouse keeper's name is Orla. " * 40)
    ck = str(tmp_path / "ck")
    mc_build_ck.main(["--input", str(corpus), "--out", ck, "-i", "base", "-g", "web_ck", "--device-type", "cpu"])
    model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag="web_ck")
    args = argparse.Namespace(source="base", w_max=None, gist_first=False, ck=[ck])
    new_session = megacontext_sessions(args, model, "web_ck", 5, "cpu")
    client = TestClient(create_app(Engine(model, tokenizer), tokenizer, DEFAULTS, new_session), base_url=LOCAL)
    for _ in range(2):
        r = client.post("/chat/completions", json={"messages": [{"role": "user", "content": "who keeps the lighthouse?"}]})
        assert r.status_code == 200
        focus = sse_events(r.text)[-2]["focus"]
        assert focus["memories"]["ck"]["slots"] > 0 and focus["memories"]["ck"]["tokens"] > 400
        assert focus["wc_cost"] <= focus["w_max"]


@pytest.mark.parametrize("flags, needle", [(["-p", "99999"], "--port"), (["-p", "-1"], "--port"), (["--w-max", "64"], "--w-max needs --megacontext")])
def test_bad_server_flags_stop_before_the_model_loads(monkeypatch, capsys, flags, needle):
    """A bad port was a 25-frame traceback after the model loaded; --w-max without --megacontext was ignored."""
    from scripts import chat_web
    monkeypatch.setattr(sys, "argv", ["chat_web", *flags])
    monkeypatch.setattr(chat_web, "compute_init", lambda *a: pytest.fail("ran past the flag checks"))
    with pytest.raises(SystemExit) as e:
        chat_web.main()
    assert e.value.code == 2 and needle in capsys.readouterr().err
