// Parses and semantically analyzes KQL queries with Kusto.Language (Microsoft's parser and
// binder, compiled to JavaScript) against the tables given on stdin.
//
// stdin:  {"database": "workspace", "tables": [{"name": "T", "schema": "(a:string, b:dynamic)"}],
//          "queries": [{"name": "rule", "text": "T | where a == 'x'"}]}
// stdout: {"rule": [{"severity": "Error", "message": "...", "start": 12, "length": 3}], ...}
"use strict";
const fs = require("fs");
const path = require("path");

const packageDir = path.join(__dirname, "node_modules", "@kusto", "language-service-next");
require(path.join(packageDir, "bridge.min.js"));
require(path.join(packageDir, "Kusto.Language.Bridge.min.js"));
const K = Kusto.Language;

function globalsFor(request) {
  const symbols = new (System.Collections.Generic.List$1(K.Symbols.Symbol))();
  for (const table of request.tables) {
    symbols.add(new K.Symbols.TableSymbol.$ctor7(table.name, table.schema, table.name));
  }
  const database = new K.Symbols.DatabaseSymbol.$ctor1(request.database, symbols, false);
  return K.GlobalState.Default.WithDatabase(database);
}

function diagnostics(text, globals) {
  const found = K.KustoCode.ParseAndAnalyze(text, globals).GetDiagnostics();
  const out = [];
  for (let i = 0; i < found.Count; i++) {
    const d = found.getItem(i);
    out.push({ severity: String(d.Severity), message: d.Message, start: d.Start, length: d.Length });
  }
  return out;
}

const request = JSON.parse(fs.readFileSync(0, "utf8"));
const globals = globalsFor(request);
const result = {};
for (const query of request.queries) {
  result[query.name] = diagnostics(query.text, globals);
}
process.stdout.write(JSON.stringify(result));
