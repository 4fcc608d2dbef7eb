// A tap on the client's stream transport, passed as options.fetch / options.WebSocket, that makes
// a real server's stream misbehave the way a network does: `silence()` — the server keeps
// sending, nothing more reaches the client (a half-open link: no close, no error); `hold` — a
// new stream connection opens (SSE response headers, WebSocket upgrade) but what the server sends
// on it is held back until `release()`.
import type { WebSocketLike, WebSocketConstructor } from "../../src/index.js";
import { MiniWebSocket } from "./miniws.js";

class Conn {
  muted = false;
  private queue: (() => void)[] | null;

  constructor(held: boolean) {
    this.queue = held ? [] : null;
  }

  /** Do `deliver` now, later (held) or never (muted). */
  deliver(deliver: () => void): void {
    if (this.muted) return;
    if (this.queue) this.queue.push(deliver);
    else deliver();
  }

  release(): void {
    const q = this.queue;
    this.queue = null;
    for (const d of q ?? []) if (!this.muted) d();
  }
}

export class StreamTap {
  /** new stream connections hold what the server sends until {@link StreamTap.release} */
  hold = false;
  /** stream connections opened so far */
  opened = 0;
  private readonly conns: Conn[] = [];
  readonly fetch: typeof fetch;
  readonly WebSocket: WebSocketConstructor;

  constructor() {
    const open = (): Conn => {
      const c = new Conn(this.hold);
      this.conns.push(c);
      this.opened++;
      return c;
    };
    this.fetch = async (input, init) => {
      const r = await fetch(input, init);
      const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
      if (!new URL(url).pathname.startsWith("/v1/stream") || !r.body) return r;
      const conn = open();
      const upstream = r.body.getReader();
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          void (async () => {
            try {
              for (;;) {
                const { value, done } = await upstream.read();
                if (done) {
                  conn.deliver(() => { try { controller.close(); } catch { /* cancelled */ } });
                  return;
                }
                conn.deliver(() => { try { controller.enqueue(value); } catch { /* cancelled */ } });
              }
            } catch (e) {
              try { controller.error(e); } catch { /* cancelled */ }
            }
          })();
        },
        cancel(reason) {
          return upstream.cancel(reason);
        },
      });
      return new Response(body, { status: r.status, statusText: r.statusText, headers: r.headers });
    };
    this.WebSocket = class TappedWebSocket implements WebSocketLike {
      onopen: ((ev: unknown) => void) | null = null;
      onmessage: ((ev: { data: unknown }) => void) | null = null;
      onclose: ((ev: { code: number; reason: string }) => void) | null = null;
      onerror: ((ev: unknown) => void) | null = null;
      private readonly inner: MiniWebSocket;

      constructor(url: string) {
        const conn = open();
        this.inner = new MiniWebSocket(url);
        this.inner.onopen = (ev) => this.onopen?.(ev);
        this.inner.onmessage = (ev) => conn.deliver(() => this.onmessage?.(ev));
        this.inner.onclose = (ev) => conn.deliver(() => this.onclose?.(ev));
        this.inner.onerror = (ev) => conn.deliver(() => this.onerror?.(ev));
      }

      get readyState(): number {
        return this.inner.readyState;
      }

      send(data: string): void {
        this.inner.send(data);
      }

      close(code?: number, reason?: string): void {
        this.inner.close(code, reason);
      }
    };
  }

  /** From now on nothing the server sends on the connections opened so far reaches the client. */
  silence(): void {
    for (const c of this.conns) c.muted = true;
  }

  /** Stop holding: what the held connections received is delivered now, and new ones pass. */
  release(): void {
    this.hold = false;
    for (const c of this.conns) c.release();
  }
}
