"""A raw HTTP/1.1 client over one socket (h11 parses), for what httpx hides: several
requests on one keep-alive connection, bodies cut short, headers never finished, a
client that never reads."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import h11


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawConnection:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        """One request and its whole answer; the connection stays open for the next."""
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        sent = {"host": self.host, "content-length": str(len(body)), **(headers or {})}
        self._send(h11.Request(method=method, target=path, headers=list(sent.items())))
        self._send(h11.Data(data=body))
        self._send(h11.EndOfMessage())
        return self.read_answer()

    def read_answer(self) -> Answer:
        status, headers, chunks = 0, {}, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed_by_server(self) -> bool:
        """Block (up to the socket timeout) until the server closes; True if it did."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.sock.sendall(data)
