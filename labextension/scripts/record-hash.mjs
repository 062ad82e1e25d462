// After a build: record a hash of the sources in the built extension, so a test (tests/test_lab_build.py)
// can tell without Node whether the committed build still matches the sources. The Python twin of this
// hash is in tests/test_lab_build.py: the same files, the same order, the same bytes.
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const INPUTS = ['package.json', 'tsconfig.json', 'src', 'style', 'schema'];

function files(path) {
  if (statSync(path).isDirectory()) {
    return readdirSync(path).sort().flatMap(name => files(join(path, name)));
  }
  return [path];
}

const hash = createHash('sha256');
for (const input of INPUTS) {
  for (const file of files(join(root, input))) {
    hash.update(relative(root, file).split('\\').join('/') + '\n');
    hash.update(readFileSync(file));
    hash.update('\n');
  }
}
const out = join(root, '..', 'plexus_mcp_jupyter', 'labextension', 'sources.sha256');
writeFileSync(out, hash.digest('hex') + '\n');
console.log(`recorded the sources' hash in ${relative(process.cwd(), out)}`);
