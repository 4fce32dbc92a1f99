// Settings kept in the browser's localStorage: the API key, the system prompt for new
// conversations and the sampling fields sent with each message. An empty sampling field
// is left out of the request, so the server's default applies.

const STORAGE_KEY = "bitserve.settings";
const API_KEY = "bitserve.apiKey";

export const DEFAULTS = Object.freeze({
  systemPrompt: "",
  temperature: "0.7",
  maxTokens: "512",
  topP: "0.95",
  topK: "40",
});

// form field id → settings name, and the request field it fills (number fields only)
const FIELDS = [
  ["system-prompt", "systemPrompt", null],
  ["temperature", "temperature", "temperature"],
  ["max-tokens", "maxTokens", "max_tokens"],
  ["top-p", "topP", "top_p"],
  ["top-k", "topK", "top_k"],
];

function read(key) {
  try {
    return window.localStorage.getItem(key);
  } catch {
    return null; // storage disabled: settings last for this page only
  }
}

function write(key, value) {
  try {
    window.localStorage.setItem(key, value);
  } catch {
    // storage disabled or full: keep the value in the form only
  }
}

export class Settings {
  constructor() {
    let stored = {};
    try {
      stored = JSON.parse(read(STORAGE_KEY) || "{}");
    } catch {
      stored = {};
    }
    this.values = { ...DEFAULTS, ...stored };
    this.apiKey = read(API_KEY) || "";
  }

  /** Fill the form and keep the settings in step with it. */
  bind(form, onKeyChange) {
    for (const [id, name] of FIELDS) {
      const input = form.querySelector(`#${id}`);
      input.value = this.values[name];
      input.addEventListener("input", () => {
        this.values[name] = input.value;
        write(STORAGE_KEY, JSON.stringify(this.values));
      });
    }
    const key = form.querySelector("#api-key");
    key.value = this.apiKey;
    key.addEventListener("change", () => {
      this.apiKey = key.value.trim();
      write(API_KEY, this.apiKey);
      onKeyChange();
    });
  }

  /** The sampling fields of a chat request, from the non-empty number fields. */
  sampling() {
    const fields = {};
    for (const [, name, field] of FIELDS) {
      const text = String(this.values[name]).trim();
      if (field && text !== "" && Number.isFinite(Number(text))) fields[field] = Number(text);
    }
    return fields;
  }

  get systemPrompt() {
    return this.values.systemPrompt.trim();
  }
}
