// The oddsfeed server the tests run against: ODDSFEED_URL when set (tests/test_ts_client.py starts
// a real `oddsfeed run --sim-push` and passes its URL), else a private `python3 -m feed run --sim-push`
// started here on a free loopback port (stopped when the tests end): the Betfair-protocol simulator
// plus the same matches in the push format, whose soccer and basketball in play carry scores and a
// clock (the Betfair stream has none). Every wait is bounded.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "..", "..");

export interface Server { url: string; stop(): Promise<void>; }

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => ok(port));
    });
  });
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Resolves when GET /v1/markets lists open markets (bounded by `timeoutMs`). */
export async function waitForMarkets(url: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`${url}/v1/markets`, { signal: AbortSignal.timeout(2000) });
      if (r.ok) {
        const body = (await r.json()) as { markets: { status: string }[] };
        if (body.markets.some((m) => m.status === "OPEN")) return;
        last = `${body.markets.length} markets, none open`;
      } else {
        last = `HTTP ${r.status}`;
      }
    } catch (e) {
      last = String(e);
    }
    await sleep(200);
  }
  throw new Error(`no open markets at ${url} within ${timeoutMs} ms (${last})`);
}

export async function startServer(): Promise<Server> {
  const given = process.env.ODDSFEED_URL;
  if (given) {
    const url = given.replace(/\/+$/, "");
    if (!/^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(url)) {
      throw new Error(`ODDSFEED_URL must be a loopback http URL, not ${given}`);
    }
    await waitForMarkets(url);
    return { url, stop: async () => undefined };
  }
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "oddsfeed-ts-"));
  const python = process.env.ODDSFEED_PYTHON || "python3";
  const proc: ChildProcess = spawn(python, ["-m", "feed", "run", "--host", "127.0.0.1", "--port", String(port),
    "--data-dir", join(dir, "var"), "--metrics-port", "0", "--sim-rate", "100", "--sim-seed", "11", "--sim-push"],
  { cwd: REPO, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, PYTHONUNBUFFERED: "1" } });
  let log = "";
  proc.stdout?.on("data", (d) => { log = (log + d).slice(-4000); });
  proc.stderr?.on("data", (d) => { log = (log + d).slice(-4000); });
  const url = `http://127.0.0.1:${port}`;
  const stop = async (): Promise<void> => {
    if (proc.exitCode === null) {
      proc.kill("SIGTERM");
      await Promise.race([new Promise((r) => proc.once("exit", r)), sleep(20_000)]);
      if (proc.exitCode === null) proc.kill("SIGKILL");
    }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await waitForMarkets(url);
  } catch (e) {
    await stop();
    throw new Error(`${(e as Error).message}\n${log}`);
  }
  return { url, stop };
}
