"""`ponder chat`: ask a running server and print rounds, answer and the reasoning summary."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def _body(args: argparse.Namespace, model: str) -> dict:
    reasoning = {
        k: v
        for k, v in {
            "tier": args.tier,
            "max_rounds": args.max_rounds,
            "min_rounds": args.min_rounds,
        }.items()
        if v is not None
    }
    body: dict = {"model": model, "messages": [{"role": "user", "content": args.question}]}
    if reasoning:
        body["reasoning"] = reasoning
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    return body


def _summary(reasoning: dict) -> str:
    lines = [f"tier={reasoning['tier']} exit={reasoning['exit_reason']} rounds={len(reasoning['rounds'])}"]
    for r in reasoning["rounds"]:
        lines.append(
            f"  round {r['index']}: {r['prompt_tokens']} prompt + {r['completion_tokens']} completion "
            f"tokens, confidence {r['confidence']}, {r['latency_ms']:.0f} ms -> {r['decision']}"
        )
    return "\n".join(lines)


def _stream(client: httpx.Client, url: str, body: dict) -> int:
    body["stream"] = True
    in_reasoning = False
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code >= 400:
            resp.read()
            return _fail(resp)
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                return 1
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("reasoning_content"):
                in_reasoning = True
                print(delta["reasoning_content"], end="", flush=True)
            if delta.get("content"):
                if in_reasoning:
                    print("\n[answer]")
                    in_reasoning = False
                print(delta["content"], end="", flush=True)
            if chunk.get("reasoning"):
                print("\n\n" + _summary(chunk["reasoning"]))
    return 0


def _fail(resp: httpx.Response) -> int:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    print(f"error: HTTP {resp.status_code}: {message}", file=sys.stderr)
    return 1


def chat(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    key = getattr(args, "api_key", None) or os.environ.get("PONDER_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0), headers=headers) as client:
            models = client.get(f"{base}/v1/models")
            if models.status_code != 200:
                return _fail(models)
            body = _body(args, models.json()["data"][0]["id"])
            url = f"{base}/v1/chat/completions"
            if args.stream:
                return _stream(client, url, body)
            resp = client.post(url, json=body)
            if resp.status_code != 200:
                return _fail(resp)
            data = resp.json()
    except httpx.HTTPError as exc:
        print(
            f"error: cannot reach Ponder at {base} ({exc}); is `ponder serve` running?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    msg = data["choices"][0]["message"]
    if msg.get("reasoning_content"):
        print(msg["reasoning_content"].rstrip() + "\n")
    print("[answer]\n" + (msg.get("content") or ""))
    print("\n" + _summary(data["reasoning"]))
    return 0
