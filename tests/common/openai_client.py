"""The official OpenAI Python SDK as a client of token-broker's proxy, run
by tests/proxy.rs (through tests/common/openai_sdk.rs) with the python of
the virtualenv .ci/install-openai-sdk makes.

    python openai_client.py COMMAND --base-url=URL [--api-key=KEY] [--expect=TEXT]

(With `=`: a key may start with a dash.) Without --api-key its requests
carry no Authorization header.

Every line it prints on stdout is one JSON object, an "event". Times are
CLOCK_MONOTONIC nanoseconds, the clock the Rust side reads too.

Commands:
  stream      one streamed chat completion: "chunks" (each chunk's id,
              content and arrival time), then "done"
  chat        one chat completion, not streamed: "done" (--timeout: the
              SDK gives up after so many seconds, closing its connection)
  disconnect  a streamed chat completion closed after its first chunk:
              "chunk", then "closed" (when it began closing, and when it
              was closed); then waits until stdin closes
  many        --clients N: prints "ready", reads one JSON line
              {"base_url", "api_key"} from stdin, then runs N streamed chat
              completions at once (asyncio, AsyncOpenAI), each client
              starting a new one up to --jitter seconds after its last
              ends, until stdin says "stop": "summary" (ok, failed, the
              first errors)

An error from the SDK is printed as an "error" event (its class, HTTP
status, code and message) and ends the run with exit status 3.
"""

import argparse
import asyncio
import json
import random
import sys
import time

import openai

MODEL = "gpt-sim"
MESSAGES = [{"role": "user", "content": "Say PONG."}]


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def error_fields(e):
    body = getattr(e, "body", None)
    return {
        "class": type(e).__name__,
        "status": getattr(e, "status_code", None),
        "code": getattr(e, "code", None),
        "message": getattr(e, "message", str(e)),
        "body": body if isinstance(body, (dict, list, str)) else None,
    }


def client(args):
    # No retries of the SDK's own: every failure must show. The SDK will
    # not send a request without an API key unless the request itself
    # leaves the header out (see `auth`).
    api_key = args.api_key if args.api_key is not None else "unused"
    return openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=0, timeout=args.timeout)


def auth(args):
    """Without --api-key, requests carry no Authorization header at all."""
    if args.api_key is None:
        return {"extra_headers": {"Authorization": openai.omit}}
    return {}


def stream(args):
    chunks = []
    with client(args).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **auth(args)
    ) as response:
        for chunk in response:
            at = now_ns()
            content = chunk.choices[0].delta.content if chunk.choices else None
            chunks.append({"id": chunk.id, "content": content, "at_ns": at, "usage": chunk.usage is not None})
    emit("chunks", chunks=chunks)
    emit("done", content="".join(c["content"] or "" for c in chunks))


def chat(args):
    completion = client(args).chat.completions.create(model=MODEL, messages=MESSAGES, **auth(args))
    emit("done", id=completion.id, content=completion.choices[0].message.content)


def disconnect(args):
    response = client(args).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **auth(args))
    first = next(iter(response))
    emit("chunk", id=first.id, at_ns=now_ns())
    closing = now_ns()
    # Closes the connection mid-stream (its body is not read to the end).
    response.close()
    emit("closed", closing_ns=closing, at_ns=now_ns())
    sys.stdin.read()


async def many(args):
    emit("ready")
    loop = asyncio.get_running_loop()
    config = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    stop = asyncio.Event()

    async def watch_stdin():
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "stop":
                stop.set()
                return

    watcher = asyncio.ensure_future(watch_stdin())
    sdk = openai.AsyncOpenAI(base_url=config["base_url"], api_key=config["api_key"], max_retries=0, timeout=60)
    counts = {"ok": 0, "failed": 0}
    errors = []

    async def one_client():
        while not stop.is_set():
            try:
                response = await sdk.chat.completions.create(
                    model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
                )
                text = ""
                async for chunk in response:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                if text == args.expect:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    errors.append(f"answer {text!r}, expected {args.expect!r}")
            except Exception as e:  # noqa: BLE001 - every failure is counted
                counts["failed"] += 1
                errors.append(json.dumps(error_fields(e)))
            # Out of step with the others (about as long as a stream), so
            # that streams start and end at every moment and an expiry
            # falls inside some of them.
            await asyncio.sleep(random.uniform(0, args.jitter))

    await asyncio.gather(*(one_client() for _ in range(args.clients)))
    watcher.cancel()
    await sdk.close()
    emit("summary", ok=counts["ok"], failed=counts["failed"], errors=errors[:10])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["stream", "chat", "disconnect", "many"])
    parser.add_argument("--base-url")
    parser.add_argument("--api-key")
    parser.add_argument("--expect", default="")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--jitter", type=float, default=0.8, help="many: seconds between a client's streams, at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (the SDK's timeout)")
    args = parser.parse_args()
    emit("sdk", version=openai.__version__)
    try:
        if args.command == "stream":
            stream(args)
        elif args.command == "chat":
            chat(args)
        elif args.command == "disconnect":
            disconnect(args)
        else:
            asyncio.run(many(args))
    except openai.OpenAIError as e:
        emit("error", **error_fields(e))
        sys.exit(3)


if __name__ == "__main__":
    main()
