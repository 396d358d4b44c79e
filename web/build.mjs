// Builds the page into ../dispatcher/web/ (committed: `make run` needs neither npm nor a CDN).
//
//   app.js      src/app.js and the Pipecat client libraries, bundled by esbuild
//   index.html  src/index.html
//   app.css     src/app.css
//   build.json  sha256 of every source (package.json, package-lock.json, build.mjs, src/**)
//               and of every output; tests/test_web_assets.py recomputes them, so a change to
//               a source without a rebuild fails the tests.
//
// The source hash: each source's sha256 in hex, as lines "<sha256>  <path>\n" (sha256sum's
// format) sorted by path, the whole hashed again.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const webDir = dirname(fileURLToPath(import.meta.url));
const srcDir = join(webDir, "src");
const outDir = join(webDir, "..", "dispatcher", "web");

const sha256 = (data) => createHash("sha256").update(data).digest("hex");
const posix = (path) => path.split(sep).join("/");

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    return entry.isDirectory() ? walk(path) : [path];
  });
}

function hashFiles(paths, base) {
  const files = {};
  for (const path of paths) files[posix(relative(base, path))] = sha256(readFileSync(path));
  const names = Object.keys(files).sort();
  const sorted = Object.fromEntries(names.map((name) => [name, files[name]]));
  const digest = sha256(names.map((name) => `${files[name]}  ${name}\n`).join(""));
  return { digest, files: sorted };
}

// daily-js (the transport's default media manager) fetches its call machine from Daily's CDN;
// the page brings its own manager (src/media.js), so daily-js must never reach the bundle.
const noDaily = {
  name: "no-daily-js",
  setup(build) {
    build.onResolve({ filter: /^@daily-co\/daily-js$/ }, () => ({
      path: "daily-js-stub",
      namespace: "no-daily-js",
    }));
    build.onLoad({ filter: /.*/, namespace: "no-daily-js" }, () => ({
      contents:
        "export default { getCallInstance() { throw new Error('daily-js is not bundled'); }," +
        " createCallObject() { throw new Error('daily-js is not bundled'); } };",
      loader: "js",
    }));
  },
};

rmSync(outDir, { recursive: true, force: true });
mkdirSync(outDir, { recursive: true });

await esbuild.build({
  absWorkingDir: webDir,
  entryPoints: [join(srcDir, "app.js")],
  outfile: join(outDir, "app.js"),
  bundle: true,
  format: "iife",
  platform: "browser",
  target: ["es2020"],
  minify: true,
  legalComments: "eof",
  charset: "utf8",
  plugins: [noDaily],
  logLevel: "warning",
});
for (const name of ["index.html", "app.css"]) {
  writeFileSync(join(outDir, name), readFileSync(join(srcDir, name)));
}

const sources = hashFiles(
  ["package.json", "package-lock.json", "build.mjs"].map((name) => join(webDir, name)).concat(walk(srcDir)),
  webDir,
);
const outputs = hashFiles(
  ["app.js", "index.html", "app.css"].map((name) => join(outDir, name)),
  outDir,
);
const manifest = {
  comment: "Written by web/build.mjs (make web); checked by tests/test_web_assets.py.",
  esbuild: esbuild.version,
  sourceHash: sources.digest,
  sources: sources.files,
  outputs: outputs.files,
};
writeFileSync(join(outDir, "build.json"), JSON.stringify(manifest, null, 2) + "\n");
console.log(`built ${posix(relative(process.cwd(), outDir))} (sources ${sources.digest.slice(0, 12)})`);
