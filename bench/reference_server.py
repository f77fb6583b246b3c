"""The floor for the daemon's throughput: a minimal trio + h11 server answering a fixed token.

    python bench/reference_server.py SOCKET_PATH

No routing, no agent, no limits, no peer check: one task per connection, h11 for HTTP, the same
`text/plain` answer as `GET /v1/token` with `Accept: text/plain`. The bench measures it with the
same load as the daemon, in the same run, so "daemon / reference" is a ratio that means the same
on any machine: how much of trio's own cost per request the agent adds to.
"""

from __future__ import annotations

import os
import socket
import sys

import h11
import trio

TOKEN = b"eyJhbGciOiJSUzI1NiJ9." + b"x" * 1100  # about the size of an IMS access token


async def connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.SEND_BODY:
                    return
                continue
            if isinstance(event, h11.Request):
                continue
            if isinstance(event, h11.EndOfMessage):
                headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(TOKEN)))]
                out = conn.send(h11.Response(status_code=200, headers=headers))
                out += conn.send(h11.Data(data=TOKEN)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                continue
            return  # ConnectionClosed or anything unexpected
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main(path: str) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1024)  # as the daemon (unixsocket.LISTEN_BACKLOG)
    print("ready", flush=True)
    await trio.serve_listeners(connection, [trio.SocketListener(sock)])


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1])
    except KeyboardInterrupt:
        pass
    finally:
        if os.path.exists(sys.argv[1]):
            os.unlink(sys.argv[1])
