export * from "./schema.js";
export * from "./errors.js";
export {
  Book, applyDelta, applySelectionChange, mergeSelections, normaliseMarket, normaliseSelection,
  HEADER_FIELDS, SELECTION_FIELDS,
  type ApplyResult, type BookMarket, type BookSelection, type Delta,
} from "./book.js";
export { SseParser, type SseEvent } from "./sse.js";
export {
  LAG_RECONNECT_HEARTBEATS, LAG_RECONNECT_SPREAD_MS, OddsClient, keyType, marketKey, raceEventId,
  type ClientEventName, type ClientListener, type ClientStats, type FetchLike, type OddsClientOptions,
  type OddsFormat, type PriceCheckLeg, type SourceState, type Transport, type WebSocketConstructor, type WebSocketLike,
} from "./client.js";
