// Typed errors of the client. Every error the client raises is an OddsfeedError.

/** Base class of every error this package raises. */
export class OddsfeedError extends Error {
  override name = "OddsfeedError";
}

/** The server refused the stream for a reason retrying will not fix (bad filter, missing API
 *  key …): `status` (HTTP) and `code` (the `error` of the JSON body, or of an `error` message)
 *  say which. The client stops; {@link OddsClient.waitSynced} rejects with it. */
export class StreamError extends OddsfeedError {
  override name = "StreamError";
  constructor(message: string, readonly status?: number, readonly code?: string) {
    super(message);
  }
}

/** A price check the server did not answer with a result: `status` (HTTP; undefined for a
 *  transport error or timeout), `code` (`error` of the JSON body, `"timeout"`, `"network"`)
 *  and the server's `serverMessage`; `retryAfterMs`: for a `429 rate_limited` (the tenant's
 *  price checks per second), ms until a retry can pass, else undefined. */
export class PriceCheckError extends OddsfeedError {
  override name = "PriceCheckError";
  constructor(message: string, readonly status?: number, readonly code?: string, readonly serverMessage?: string,
              readonly retryAfterMs?: number) {
    super(message);
  }
}

/** A REST call (GET /v1/markets …) answered with an error: `status`, `code` (`error` of the body). */
export class HttpError extends OddsfeedError {
  override name = "HttpError";
  constructor(message: string, readonly status?: number, readonly code?: string) {
    super(message);
  }
}

/** A bounded wait ran out (waitSynced, waitFor, a REST or price-check deadline). */
export class OddsTimeoutError extends OddsfeedError {
  override name = "OddsTimeoutError";
}

/** A market's delta skipped a seq: the client resyncs (internal reason of a reconnect; also
 *  what {@link OddsClient.lastGap} describes). */
export class SeqGapError extends OddsfeedError {
  override name = "SeqGapError";
  constructor(readonly marketId: string, readonly held: number, readonly got: number) {
    super(`seq gap on market ${marketId}: held ${held}, got ${got}`);
  }
}

/** The stream ended or went silent: the client reconnects (internal). */
export class DroppedError extends OddsfeedError {
  override name = "DroppedError";
}
