// A minimal RFC 6455 WebSocket client (text frames, ping/pong, close, fragmentation) for Node 20,
// which has no global WebSocket without --experimental-websocket: passed to OddsClient as
// options.WebSocket. Loopback tests only; no extensions, no TLS.
import { createHash, randomBytes } from "node:crypto";
import { request } from "node:http";
import type { Socket } from "node:net";
import type { WebSocketLike } from "../../src/index.js";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

export class MiniWebSocket implements WebSocketLike {
  /** every instance, newest last (tests drop the network under one) */
  static readonly instances: MiniWebSocket[] = [];
  readyState = 0;
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  private socket: Socket | null = null;
  private buf: Buffer = Buffer.alloc(0);
  private fragments: Buffer[] = [];
  private closeCode = 1006;
  private closeReason = "";
  private closed = false;

  constructor(url: string) {
    MiniWebSocket.instances.push(this);
    const u = new URL(url);
    const key = randomBytes(16).toString("base64");
    const req = request({
      host: u.hostname, port: Number(u.port || 80), path: u.pathname + u.search, timeout: 10_000,
      headers: { Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13" },
    });
    req.on("upgrade", (res, socket, head) => {
      const want = createHash("sha1").update(key + GUID).digest("base64");
      if (res.headers["sec-websocket-accept"] !== want) {
        socket.destroy();
        this.fail(1002, "bad Sec-WebSocket-Accept");
        return;
      }
      this.socket = socket;
      socket.setNoDelay(true);
      socket.on("data", (d: Buffer) => this.onData(d));
      socket.on("close", () => this.fireClose());
      socket.on("error", () => undefined);
      this.readyState = 1;
      this.onopen?.({});
      if (head.length) this.onData(head);
    });
    req.on("response", (res) => {
      res.resume();
      this.fail(1006, `HTTP ${res.statusCode}`);
    });
    req.on("timeout", () => req.destroy(new Error("handshake timeout")));
    req.on("error", (e) => this.fail(1006, e.message));
    req.end();
  }

  send(data: string): void {
    if (this.readyState !== 1 || !this.socket) throw new Error("WebSocket is not open");
    this.socket.write(frame(0x1, Buffer.from(data, "utf8")));
  }

  close(code = 1000, reason = ""): void {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    if (this.socket) {
      const body = Buffer.alloc(2 + Buffer.byteLength(reason));
      body.writeUInt16BE(code, 0);
      body.write(reason, 2);
      this.socket.write(frame(0x8, body));
      this.closeCode = code;
      this.closeReason = reason;
      this.socket.end();
      setTimeout(() => this.socket?.destroy(), 1000).unref();
    } else {
      this.fireClose();
    }
  }

  /** Drop the TCP connection without a close handshake (a network failure). */
  dropNetwork(): void {
    this.socket?.destroy();
  }

  private fail(code: number, reason: string): void {
    this.closeCode = code;
    this.closeReason = reason;
    this.onerror?.({ message: reason });
    this.fireClose();
  }

  private fireClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.readyState = 3;
    this.onclose?.({ code: this.closeCode, reason: this.closeReason });
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    for (;;) {
      if (this.buf.length < 2) return;
      const b0 = this.buf[0], b1 = this.buf[1];
      let len = b1 & 0x7f;
      let off = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        off = 4;
      } else if (len === 127) {
        if (this.buf.length < 10) return;
        len = Number(this.buf.readBigUInt64BE(2));
        off = 10;
      }
      const masked = (b1 & 0x80) !== 0;
      const maskOff = off;
      if (masked) off += 4;
      if (this.buf.length < off + len) return;
      let payload = this.buf.subarray(off, off + len);
      if (masked) {
        const m = this.buf.subarray(maskOff, maskOff + 4);
        payload = Buffer.from(payload.map((x, i) => x ^ m[i & 3]));
      }
      this.buf = this.buf.subarray(off + len);
      this.onFrame((b0 & 0x80) !== 0, b0 & 0x0f, Buffer.from(payload));
    }
  }

  private onFrame(fin: boolean, opcode: number, payload: Buffer): void {
    if (opcode === 0x8) {
      this.closeCode = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      this.closeReason = payload.length > 2 ? payload.subarray(2).toString("utf8") : "";
      if (this.readyState === 1 && this.socket) {
        this.readyState = 2;
        this.socket.write(frame(0x8, payload.subarray(0, 2)));
        this.socket.end();
      }
      return;
    }
    if (opcode === 0x9) { this.socket?.write(frame(0xa, payload)); return; }
    if (opcode === 0xa) return;
    if (opcode === 0x1 || opcode === 0x2 || opcode === 0x0) {
      this.fragments.push(payload);
      if (!fin) return;
      const all = Buffer.concat(this.fragments);
      this.fragments = [];
      if (this.readyState === 1) this.onmessage?.({ data: all.toString("utf8") });
    }
  }
}

function frame(opcode: number, payload: Buffer): Buffer {
  const mask = randomBytes(4);
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, 0x80 | n])
    : n < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, n >> 8, n & 0xff])
      : Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b; })()]);
  const body = Buffer.from(payload.map((x, i) => x ^ mask[i & 3]));
  return Buffer.concat([head, mask, body]);
}
