// Bundles src/ into dist/ (served by the API under /dashboard, or by any static host).
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist", { recursive: true });
await build({
  entryPoints: ["src/main.js"],
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "esm",
  target: ["es2020"],
  outfile: "dist/app.js",
  loader: { ".css": "css" },
});
cpSync("src/index.html", "dist/index.html");
cpSync("src/style.css", "dist/style.css");
