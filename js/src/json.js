/**
 * A strict JSON reader for manifest.json (X1): JSON.parse keeps the last of two equal keys silently and cannot tell
 * `2.0` from `2`. This parser refuses a repeated key (naming its field) and records where an integral number was
 * written with a fraction or exponent, so that the manifest check can refuse it in an integer field.
 * @module
 */

const LITERAL = /true|false|null|-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/y;
const STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;

/**
 * @param {string} text
 * @returns {{value: any, floatSpelled: Array<Array<string|number>>}}
 * @throws {SyntaxError} with the field or offset
 */
export function parseStrictJson(text) {
  let at = 0;
  /** @type {Array<Array<string|number>>} */
  const floatSpelled = [];
  const fail = (what) => {
    throw new SyntaxError(`${what} at character ${at}`);
  };
  const space = () => {
    while (at < text.length && " \t\n\r".includes(text[at])) at++;
  };
  const name = (path) => path.map((p) => (typeof p === "number" ? `[${p}]` : `.${p}`)).join("").replace(/^\./, "");
  /** @param {Array<string|number>} path */
  const value = (path) => {
    space();
    const char = text[at];
    if (char === "{") {
      at++;
      const object = {};
      const seen = new Set();
      space();
      if (text[at] === "}") {
        at++;
        return object;
      }
      for (;;) {
        space();
        if (text[at] !== '"') fail("expected a key");
        const key = string();
        if (seen.has(key)) throw new SyntaxError(`key '${key}' appears twice in ${name(path) || "the top level"}`);
        seen.add(key);
        space();
        if (text[at++] !== ":") fail("expected ':'");
        const item = value([...path, key]);
        Object.defineProperty(object, key, { value: item, enumerable: true, writable: true, configurable: true });
        space();
        if (text[at] === ",") {
          at++;
          continue;
        }
        if (text[at] === "}") {
          at++;
          return object;
        }
        fail("expected ',' or '}'");
      }
    }
    if (char === "[") {
      at++;
      const array = [];
      space();
      if (text[at] === "]") {
        at++;
        return array;
      }
      for (;;) {
        array.push(value([...path, array.length]));
        space();
        if (text[at] === ",") {
          at++;
          continue;
        }
        if (text[at] === "]") {
          at++;
          return array;
        }
        fail("expected ',' or ']'");
      }
    }
    if (char === '"') return string();
    LITERAL.lastIndex = at;
    const literal = LITERAL.exec(text);
    if (!literal) fail("not JSON");
    at += literal[0].length;
    if (literal[0] === "true") return true;
    if (literal[0] === "false") return false;
    if (literal[0] === "null") return null;
    const number = Number(literal[0]);
    if (!Number.isFinite(number)) fail("a number out of range");
    if ((literal[1] || literal[2]) && Number.isInteger(number)) floatSpelled.push(path);
    return number;
  };
  const string = () => {
    STRING.lastIndex = at;
    const match = STRING.exec(text);
    if (!match) fail("a bad string");
    at += match[0].length;
    return JSON.parse(match[0]);
  };
  const result = value([]);
  space();
  if (at !== text.length) fail("text after the JSON value");
  return { value: result, floatSpelled };
}
