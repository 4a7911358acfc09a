/**
 * CLIP tokenization from the bundle's tokenizer.json with @huggingface/tokenizers (bundle-format.md, "The
 * tokenizer"): the file's normaliser, pre-tokeniser, BPE and post-processor; truncated to max_length with BOS and
 * EOS kept; padded on the right with the manifest's pad_id. The ids equal the Python runtime's PromptTokenizer.
 * @module
 */

import { Tokenizer } from "@huggingface/tokenizers";

export class PromptTokenizer {
  /**
   * @param {object} tokenizerJson the parsed tokenizer.json
   * @param {{name: string, max_length: number, pad_id: number}} info the manifest's tokenizers[] entry
   */
  constructor(tokenizerJson, info) {
    this.info = info;
    this.tokenizer = new Tokenizer(tokenizerJson, {});
    /** @type {string[]} prompts whose end was cut in the last call */
    this.truncated = [];
  }

  /**
   * Token ids of one prompt, exactly max_length long.
   * @param {string} prompt @returns {number[]}
   */
  encodeOne(prompt) {
    const length = this.info.max_length;
    let ids = Array.from(this.tokenizer.encode(prompt, { add_special_tokens: true }).ids, Number);
    if (ids.length > length) {
      // Truncation keeps the special tokens the post-processor added at both ends (CLIP: BOS, EOS).
      const content = Array.from(this.tokenizer.encode(prompt, { add_special_tokens: false }).ids, Number);
      const suffix = ids.length - content.length - this.prefixLength(ids, content);
      ids = [...ids.slice(0, length - suffix), ...ids.slice(ids.length - suffix)];
      this.truncated.push(prompt);
    }
    while (ids.length < length) ids.push(this.info.pad_id);
    return ids;
  }

  /** How many special tokens lead `ids` before `content` starts. */
  prefixLength(ids, content) {
    for (let start = 0; start <= ids.length - content.length; start++) {
      if (content.every((id, i) => ids[start + i] === id)) return start;
    }
    return 1;
  }

  /**
   * Ids of every prompt, (prompts, max_length) as int64.
   * @param {string[]} prompts @returns {BigInt64Array}
   */
  encode(prompts) {
    this.truncated = [];
    const length = this.info.max_length;
    const out = new BigInt64Array(prompts.length * length);
    prompts.forEach((prompt, row) => {
      this.encodeOne(prompt).forEach((id, column) => {
        out[row * length + column] = BigInt(id);
      });
    });
    return out;
  }
}
