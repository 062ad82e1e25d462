// Build the federated extension against the JupyterLab of the Python environment (its staging
// package.json gives the shared-module versions), into ../plexus_mcp_jupyter/labextension.
// JupyterLab 4.6's `jupyter labextension build` wants @jupyterlab/core-meta from the network; the builder
// itself only needs the core path. PYTHON names the interpreter that has jupyterlab (default: python3).
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { createRequire } from 'node:module';

const python = process.env.PYTHON || 'python3';
const core = execFileSync(python, ['-c', 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))'])
  .toString()
  .trim();
const require = createRequire(import.meta.url);
const builder = join(dirname(require.resolve('@jupyterlab/builder/package.json')), 'lib', 'build-labextension.js');
const root = new URL('..', import.meta.url).pathname;
execFileSync(process.execPath, [builder, '--core-path', core, root], { stdio: 'inherit' });
