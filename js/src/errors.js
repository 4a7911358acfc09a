/**
 * Errors by meaning, as the Python runtime's (lcm_export/errors.py): a caller's mistake is a UserError, a bad
 * bundle a BundleError (its message names the file or manifest field), a NaN or infinity out of a stage a
 * NonFiniteError naming the stage.
 * @module
 */

/** A mistake the caller can fix: the message says what to change. */
export class UserError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "UserError";
  }
}

/** A bundle that cannot be used: missing or modified files, an invalid manifest. */
export class BundleError extends UserError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "BundleError";
  }
}

/** A NaN or infinity came out of a stage. */
export class NonFiniteError extends UserError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "NonFiniteError";
  }
}

/** An adapter file or weight that cannot be applied to this bundle (the Python runtime's AdapterError). */
export class AdapterError extends UserError {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "AdapterError";
  }
}
