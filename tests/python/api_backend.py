"""An application backend that drives Switchboard's server API the way one
written for Azure SignalR Service does: it reads the access key from an
Azure connection string, signs an HS256 token per request whose `aud` is
the request's URL (without its query) and whose `exp` is a few minutes
away, and calls the data-plane REST API (api-version 2022-06-01).

Standard library only. The test (tests/tests/server_api.rs) feeds it one
JSON request per line on stdin and reads one JSON answer per line:

    {"method": "POST", "path": "/api/hubs/chathub/:send", "query": "reason=x",
     "json": {...} | "raw": "text", "token": "good"}
    -> {"status": 202, "body": "..."}

`token` picks how the request is signed: good, none, wrong-key, expired,
no-exp or wrong-aud (each but good must be refused).

With --serve-port it is also a serverless application's negotiate endpoint,
as Azure's serverless mode has them: `POST /chathub/negotiate?user=NAME`
answers `{"url": "<cluster>/client/?hub=chathub", "accessToken": <jwt>}`, a
token for NAME (`nameid`) whose audience is that URL (`&token=expired` or
`wrong-key` spoils it), with the CORS answers a page on the cluster's
origin needs.
"""

import argparse
import http.server
import threading
import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

API_VERSION = "2022-06-01"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict, key: str) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{body}".encode()
    signature = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def parse_connection_string(text: str) -> dict:
    parts = {}
    for part in text.split(";"):
        if "=" in part:
            name, value = part.split("=", 1)
            parts[name.strip().lower()] = value.strip()
    return parts


def token_for(kind: str, url: str, key: str):
    now = int(time.time())
    if kind == "none":
        return None
    if kind == "wrong-key":
        return jwt({"aud": url, "exp": now + 300}, "x" * 40)
    if kind == "expired":
        return jwt({"aud": url, "exp": now - 600}, key)
    if kind == "no-exp":
        return jwt({"aud": url}, key)
    if kind == "wrong-aud":
        return jwt({"aud": url.replace("/api/hubs/chathub", "/api/hubs/otherhub"), "exp": now + 300}, key)
    return jwt({"aud": url, "exp": now + 300}, key)


def call(base: str, key: str, request: dict) -> dict:
    url = base + request["path"]
    query = request.get("query")
    full = f"{url}?api-version={API_VERSION}" + (f"&{query}" if query else "")
    if "json" in request:
        data = json.dumps(request["json"]).encode()
    elif "raw" in request:
        data = request["raw"].encode()
    else:
        data = None
    req = urllib.request.Request(full, data=data, method=request["method"])
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = token_for(request.get("token", "good"), url, key)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return {"status": resp.status, "body": resp.read().decode(errors="replace")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode(errors="replace")}


def client_token(kind: str, user: str, url: str, key: str) -> str:
    now = int(time.time())
    claims = {"aud": url, "exp": now + 300, "nameid": user}
    if kind == "expired":
        claims["exp"] = now - 600
    return jwt(claims, "y" * 40 if kind == "wrong-key" else key)


def serve_negotiate(port: int, base: str, key: str) -> None:
    client_url = f"{base}/client/?hub=chathub"

    class Negotiate(http.server.BaseHTTPRequestHandler):
        def cors(self) -> None:
            origin = self.headers.get("Origin")
            if origin:
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Access-Control-Allow-Credentials", "true")
                self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
                asked = self.headers.get("Access-Control-Request-Headers")
                if asked:
                    self.send_header("Access-Control-Allow-Headers", asked)

        def do_OPTIONS(self) -> None:  # noqa: N802 (the standard library's name)
            self.send_response(204)
            self.cors()
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            path, _, query = self.path.partition("?")
            params = dict(urllib.parse.parse_qsl(query))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if path.rstrip("/") != "/chathub/negotiate" or "user" not in params:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            token = client_token(params.get("token", "good"), params["user"], client_url, key)
            body = json.dumps({"url": client_url, "accessToken": token}).encode()
            self.send_response(200)
            self.cors()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Negotiate)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--serve-port", type=int)
    args = parser.parse_args()
    settings = parse_connection_string(args.connection_string)
    base, key = settings["endpoint"].rstrip("/"), settings["accesskey"]
    if args.serve_port:
        serve_negotiate(args.serve_port, base, key)
        print(json.dumps({"serving": args.serve_port}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            answer = call(base, key, json.loads(line))
        except Exception as e:  # reported to the test, which fails with it
            answer = {"status": 0, "body": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
