// Parses and semantically analyzes KQL queries with Kusto.Language (Microsoft's parser and
// binder, compiled to JavaScript) against the tables given on stdin.
//
// stdin:  {"database": "workspace", "tables": [{"name": "T", "schema": "(a:string, b:dynamic)"}],
//          "queries": [{"name": "rule", "text": "T | where a == 'x'"}]}
// stdout: {"rule": {"diagnostics": [{"severity": "Error", "message": "...", "start": 12,
//          "length": 3}], "columns": [["a", "string"], ...]}, ...}   (columns: of a tabular result)
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

function resultColumns(code) {
  const result = code.ResultType;
  const columns = [];
  if (result && result.Columns) {
    for (let i = 0; i < result.Columns.Count; i++) {
      const column = result.Columns.getItem(i);
      columns.push([column.Name, column.Type.Name]);
    }
  }
  return columns;
}

function analyze(text, globals) {
  const code = K.KustoCode.ParseAndAnalyze(text, globals);
  const found = code.GetDiagnostics();
  const out = [];
  for (let i = 0; i < found.Count; i++) {
    const d = found.getItem(i);
    out.push({ severity: String(d.Severity), message: d.Message, start: d.Start, length: d.Length });
  }
  return { diagnostics: out, columns: resultColumns(code) };
}

const request = JSON.parse(fs.readFileSync(0, "utf8"));
const globals = globalsFor(request);
const result = {};
for (const query of request.queries) {
  result[query.name] = analyze(query.text, globals);
}
process.stdout.write(JSON.stringify(result));
