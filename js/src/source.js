/**
 * Where a bundle's files come from: a folder (Node, through node:fs) or a base URL (fetch; browsers and Node).
 * Both read bytes by bundle path and hash them (node:crypto in Node, WebCrypto elsewhere); the hashes of files
 * already verified are remembered by (path, size, mtime or ETag) so that a second load does not hash again.
 * @module
 */

import { BundleError } from "./errors.js";

export const isNode = typeof process !== "undefined" && !!process.versions?.node;

/** @type {Map<string, string>} in-memory hash cache of URL sources (key: url|size|etag) */
const memoryHashes = new Map();

/**
 * @typedef {object} FileInfo
 * @property {boolean} exists
 * @property {boolean} [regular]
 * @property {number} [size]
 * @property {string} [stamp]   mtime (Node) or ETag/Last-Modified (URL): what the hash cache keys on
 */

/** @param {Uint8Array} bytes @returns {Promise<string>} lowercase hex sha256 */
export async function sha256Hex(bytes) {
  if (isNode) {
    const { createHash } = await import("node:crypto");
    return createHash("sha256").update(bytes).digest("hex");
  }
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A bundle folder on disk (Node). */
export class FolderSource {
  /** @param {string} folder @param {{cacheDir?: string}} [options] */
  constructor(folder, options = {}) {
    this.folder = folder;
    this.cacheDir = options.cacheDir;
    this.description = folder;
  }

  /** @param {string} relative @returns {Promise<string>} */
  async resolve(relative) {
    const path = await import("node:path");
    return path.join(this.folder, ...relative.split("/"));
  }

  /** @param {string} relative @returns {Promise<FileInfo>} */
  async stat(relative) {
    const fs = await import("node:fs/promises");
    const path = await import("node:path");
    const full = await this.resolve(relative);
    let info;
    try {
      info = await fs.stat(full);
    } catch {
      return { exists: false };
    }
    // X3: the file stays inside the bundle folder after symlinks.
    const [real, root] = await Promise.all([fs.realpath(full), fs.realpath(this.folder)]);
    const inside = path.relative(root, real);
    if (inside.startsWith("..") || path.isAbsolute(inside)) {
      throw new BundleError(`BUNDLE '${this.folder}': '${relative}' leads outside the bundle folder (a symlink)`);
    }
    return { exists: true, regular: info.isFile(), size: info.size, stamp: `${info.mtimeMs}:${info.ino}` };
  }

  /** @param {string} relative @returns {Promise<Uint8Array>} */
  async read(relative) {
    const fs = await import("node:fs/promises");
    try {
      return new Uint8Array(await fs.readFile(await this.resolve(relative)));
    } catch (error) {
      throw new BundleError(`BUNDLE '${this.folder}' cannot read ${relative}: ${error.message}`);
    }
  }

  /** @param {string} relative @returns {Promise<string>} the sha256 of the file, streamed */
  async hash(relative) {
    const fs = await import("node:fs");
    const { createHash } = await import("node:crypto");
    const full = await this.resolve(relative);
    const hasher = createHash("sha256");
    await new Promise((resolve, reject) => {
      fs.createReadStream(full)
        .on("data", (chunk) => hasher.update(chunk))
        .on("end", resolve)
        .on("error", reject);
    });
    return hasher.digest("hex");
  }

  /** The hash cache: a JSON file under the cache folder, {absolute path: {stamp, size, sha256}}. */
  async loadHashCache() {
    const file = await this.hashCacheFile();
    const fs = await import("node:fs/promises");
    try {
      const data = JSON.parse(await fs.readFile(file, "utf8"));
      return data && typeof data === "object" ? data : {};
    } catch {
      return {};
    }
  }

  /** @param {Record<string, any>} entries */
  async saveHashCache(entries) {
    const file = await this.hashCacheFile();
    const fs = await import("node:fs/promises");
    const path = await import("node:path");
    try {
      await fs.mkdir(path.dirname(file), { recursive: true });
      const temporary = `${file}.${process.pid}.tmp`;
      await fs.writeFile(temporary, JSON.stringify(entries));
      await fs.rename(temporary, file);
    } catch {
      // an unwritable cache only costs a re-hash next time
    }
  }

  async hashCacheFile() {
    const path = await import("node:path");
    const os = await import("node:os");
    const root =
      this.cacheDir || process.env.LCM_EXPORT_CACHE_DIR || path.join(os.homedir(), ".cache", "lcm-export");
    return path.join(root, "js-file-hashes.json");
  }

  /** @param {string} relative @returns {Promise<string>} the cache key of a file */
  async cacheKey(relative) {
    const path = await import("node:path");
    return path.resolve(await this.resolve(relative));
  }
}

/** A bundle served from a base URL (fetch). */
export class UrlSource {
  /** @param {string} base */
  constructor(base) {
    this.base = base.endsWith("/") ? base : `${base}/`;
    this.description = base;
    /** @type {Map<string, Uint8Array>} bytes read for verification, reused by the sessions */
    this.bytes = new Map();
  }

  /** @param {string} relative */
  url(relative) {
    return new URL(relative.split("/").map(encodeURIComponent).join("/"), this.base).href;
  }

  /** @param {string} relative @returns {Promise<FileInfo>} */
  async stat(relative) {
    let response;
    try {
      response = await fetch(this.url(relative), { method: "HEAD" });
    } catch (error) {
      throw new BundleError(`BUNDLE '${this.base}' cannot fetch ${relative}: ${error.message}`);
    }
    if (!response.ok) return { exists: false };
    const length = response.headers.get("content-length");
    const stamp = response.headers.get("etag") || response.headers.get("last-modified") || "";
    return { exists: true, regular: true, size: length === null ? undefined : Number(length), stamp };
  }

  /** @param {string} relative @returns {Promise<Uint8Array>} */
  async read(relative) {
    const kept = this.bytes.get(relative);
    if (kept) return kept;
    let response;
    try {
      response = await fetch(this.url(relative));
    } catch (error) {
      throw new BundleError(`BUNDLE '${this.base}' cannot fetch ${relative}: ${error.message}`);
    }
    if (!response.ok) throw new BundleError(`BUNDLE '${this.base}' has no ${relative} (HTTP ${response.status})`);
    return new Uint8Array(await response.arrayBuffer());
  }

  /** @param {string} relative */
  async hash(relative) {
    const bytes = await this.read(relative);
    this.bytes.set(relative, bytes);
    return sha256Hex(bytes);
  }

  async loadHashCache() {
    return Object.fromEntries(memoryHashes);
  }

  /** @param {Record<string, any>} entries */
  async saveHashCache(entries) {
    for (const [key, value] of Object.entries(entries)) memoryHashes.set(key, value);
  }

  /** @param {string} relative */
  async cacheKey(relative) {
    return this.url(relative);
  }
}

/**
 * @param {string | URL} location a folder (Node) or an http(s)/file URL
 * @param {{cacheDir?: string}} [options]
 */
export async function openSource(location, options = {}) {
  const text = location instanceof URL ? location.href : String(location);
  if (/^https?:\/\//i.test(text) || (!isNode && !/^file:/i.test(text))) {
    return new UrlSource(isNode ? text : new URL(text, globalThis.location?.href).href);
  }
  if (!isNode) throw new BundleError(`BUNDLE '${text}': a folder needs Node; in a browser pass a URL`);
  let folder = text;
  if (/^file:/i.test(text)) folder = (await import("node:url")).fileURLToPath(text);
  return new FolderSource(folder, options);
}
