#!/usr/bin/env node
// Generates src/schema.ts from the `components.schemas` of oddsfeed's OpenAPI document.
//
//   node scripts/gen-types.mjs [--input FILE|URL] [--out FILE | --check FILE]
//
// --input: an openapi.json file or a server URL (http://127.0.0.1:8000 or …/openapi.json).
//          Default: the document of the checkout this package sits in (../../), built by
//          `python3 -c "from streaming.openapi import openapi_document …"` (pure: no server, no I/O);
//          ODDSFEED_PYTHON names another interpreter.
// --out:   write the TypeScript there (default: stdout).
// --check: exit 1 (saying so) when FILE differs from what would be generated.
//
// Mapping (JSON Schema 2020-12 as msgspec writes it): object → interface (a property not in
// `required` is optional), $ref → the schema's name, anyOf → union, enum → literal union,
// prefixItems → tuple, items → T[], additionalProperties → index signature, integer/number →
// number; descriptions become doc comments. Every `default` is collected into SCHEMA_DEFAULTS
// (the client fills absent fields with them, exactly as msgspec decoding does on the server).
// Output is deterministic (schema order of the document, properties in document order).
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, "..", "..", "..");

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--input" || a === "--out" || a === "--check") {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      out[a.slice(2)] = argv[++i];
    } else {
      throw new Error(`unknown argument ${a} (use --input FILE|URL, --out FILE, --check FILE)`);
    }
  }
  return out;
}

async function loadDocument(input) {
  if (!input) {
    const python = process.env.ODDSFEED_PYTHON || "python3";
    const code = "import json, sys\nfrom streaming.openapi import openapi_document\n"
      + "json.dump(openapi_document(), sys.stdout)\n";
    const text = execFileSync(python, ["-c", code], { cwd: REPO, encoding: "utf8", maxBuffer: 64 << 20 });
    return JSON.parse(text);
  }
  if (/^https?:\/\//.test(input)) {
    const url = input.endsWith("/openapi.json") ? input : input.replace(/\/+$/, "") + "/openapi.json";
    const r = await fetch(url, { signal: AbortSignal.timeout(10_000) });
    if (!r.ok) throw new Error(`GET ${url} answered ${r.status}`);
    return await r.json();
  }
  return JSON.parse(readFileSync(input, "utf8"));
}

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const key = (k) => (IDENT.test(k) ? k : JSON.stringify(k));

function refName(ref) {
  const m = /^#\/components\/schemas\/(.+)$/.exec(ref);
  if (!m) throw new Error(`unsupported $ref ${ref}`);
  return m[1];
}

function comment(text, indent) {
  if (!text) return "";
  const lines = String(text).replace(/\*\//g, "*\\/").split("\n");
  return `${indent}/**\n${lines.map((l) => `${indent} * ${l}`.trimEnd()).join("\n")}\n${indent} */\n`;
}

const needsParens = (t) => /[|&]/.test(t) && !/^\{[\s\S]*\}$/.test(t) && !/^\[[\s\S]*\]$/.test(t);

/** The TypeScript type of a (sub)schema. */
function tsType(s, indent = "") {
  if (s === true || s === undefined || (typeof s === "object" && Object.keys(s).length === 0)) return "unknown";
  if (s === false) return "never";
  if (s.$ref) return refName(s.$ref);
  if (s.anyOf || s.oneOf) {
    const parts = [];
    for (const p of s.anyOf || s.oneOf) {
      const t = tsType(p, indent);
      if (!parts.includes(t)) parts.push(t);
    }
    return parts.join(" | ");
  }
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (Array.isArray(s.type)) return s.type.map((t) => tsType({ ...s, type: t }, indent)).join(" | ");
  switch (s.type) {
    case "string": return "string";
    case "integer":
    case "number": return "number";
    case "boolean": return "boolean";
    case "null": return "null";
    case "array": {
      if (s.prefixItems) return `[${s.prefixItems.map((p) => tsType(p, indent)).join(", ")}]`;
      const t = tsType(s.items, indent);
      return needsParens(t) ? `Array<${t}>` : `${t}[]`;
    }
    case "object": return objectBody(s, indent);
    default: throw new Error(`unsupported schema ${JSON.stringify(s).slice(0, 200)}`);
  }
}

function objectBody(s, indent) {
  const props = s.properties || {};
  const required = new Set(s.required || []);
  const inner = indent + "  ";
  const lines = [];
  for (const [name, p] of Object.entries(props)) {
    lines.push(comment(p.description, inner) + `${inner}${key(name)}${required.has(name) ? "" : "?"}: ${tsType(p, inner)};`);
  }
  const ap = s.additionalProperties;
  if (ap && ap !== true) lines.push(`${inner}[key: string]: ${tsType(ap, inner)};`);
  else if (ap === true || (ap === undefined && !s.properties)) lines.push(`${inner}[key: string]: unknown;`);
  if (!lines.length) return "{}";
  return `{\n${lines.join("\n")}\n${indent}}`;
}

export function generate(doc) {
  const schemas = doc?.components?.schemas;
  if (!schemas || typeof schemas !== "object") throw new Error("the document has no components.schemas");
  const out = [
    "// GENERATED by scripts/gen-types.mjs from the components.schemas of oddsfeed's GET /openapi.json.",
    "// Do not edit: run `npm run gen` (tests/test_ts_client.py checks that regenerating gives this file).",
    "/* eslint-disable */",
    "",
  ];
  const defaults = [];
  for (const name of Object.keys(schemas)) {
    const s = schemas[name];
    const doc = comment(s.description, "");
    if (s.type === "object" && !s.anyOf) {
      out.push(`${doc}export interface ${name} ${objectBody(s, "")}`, "");
      const d = Object.entries(s.properties || {}).filter(([, p]) => p && p.default !== undefined);
      if (d.length) defaults.push([name, d.map(([k, p]) => [k, p.default])]);
    } else {
      out.push(`${doc}export type ${name} = ${tsType(s, "")};`, "");
    }
  }
  out.push("/** The `default` of every property that has one, per schema: the value an absent field takes. */");
  out.push("export const SCHEMA_DEFAULTS = {");
  for (const [name, entries] of defaults) {
    out.push(`  ${key(name)}: {`);
    for (const [k, v] of entries) out.push(`    ${key(k)}: ${JSON.stringify(v)},`);
    out.push("  },");
  }
  out.push("} as const;", "");
  out.push("/** Every schema name of components.schemas. */");
  out.push(`export const SCHEMA_NAMES = ${JSON.stringify(Object.keys(schemas))} as const;`, "");
  return out.join("\n");
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const text = generate(await loadDocument(args.input));
  if (args.check) {
    let current = null;
    try { current = readFileSync(args.check, "utf8"); } catch { /* missing: differs */ }
    if (current !== text) {
      process.stderr.write(`${args.check} is out of date with the OpenAPI document: run \`npm run gen\`\n`);
      process.exit(1);
    }
    process.stdout.write(`${args.check} is up to date\n`);
  } else if (args.out) {
    writeFileSync(args.out, text);
    process.stdout.write(`wrote ${args.out} (${text.length} bytes)\n`);
  } else {
    process.stdout.write(text);
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`gen-types: ${e.message}\n`);
    process.exit(2);
  });
}
