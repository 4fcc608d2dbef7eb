// A Server-Sent Events reader over fetch streams (WHATWG "text/event-stream" parsing):
// works wherever fetch returns a ReadableStream body — browsers and Node ≥ 18 — and, unlike
// EventSource, can send headers (X-API-Key, Last-Event-ID) and reports the HTTP status.

/** One dispatched event. `id` is the value of this event's own `id:` field, or undefined when
 *  the event had none (the resume token then stays the previous one, as WHATWG's lastEventId). */
export interface SseEvent {
  event: string;
  data: string;
  id: string | undefined;
}

/** Incremental parser: feed text chunks, get complete events. */
export class SseParser {
  private buf = "";
  private data: string[] = [];
  private event = "";
  private id: string | undefined = undefined;
  private sawField = false;

  push(chunk: string): SseEvent[] {
    this.buf += chunk;
    const out: SseEvent[] = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      if (m[0] === "\r" && m.index === this.buf.length - 1) break; // maybe the \r of a \r\n split across chunks
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    return out;
  }

  private line(line: string): SseEvent | undefined {
    if (line === "") {
      if (!this.sawField) return undefined;
      const ev = { event: this.event || "message", data: this.data.join("\n"), id: this.id };
      const hasData = this.data.length > 0;
      this.data = [];
      this.event = "";
      this.id = undefined;
      this.sawField = false;
      // WHATWG: an event without data is not dispatched, but its id still moves lastEventId
      return hasData || ev.id !== undefined ? ev : undefined;
    }
    if (line.startsWith(":")) return undefined;
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") { this.data.push(value); this.sawField = true; }
    else if (name === "event") { this.event = value; this.sawField = true; }
    else if (name === "id") { if (!value.includes("\0")) this.id = value; this.sawField = true; }
    return undefined;
  }
}
