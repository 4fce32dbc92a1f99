// The page's HTTP client. It uses only the server's public API (the same routes as any
// client), sends the API key when one is set, and turns every failure into an ApiError
// whose `sentence` is one readable line for the page's error bar.

export class ApiError extends Error {
  constructor(sentence, { status = 0, code = null } = {}) {
    super(sentence);
    this.name = "ApiError";
    this.sentence = sentence;
    this.status = status;
    this.code = code;
  }
}

const UNREACHABLE = "Cannot reach the bitserve server: it may have stopped, or the network is down.";

export class Api {
  /** `getKey()` returns the API key to send ("" for none). */
  constructor(getKey) {
    this.getKey = getKey;
  }

  /** One JSON request; resolves to the parsed body, or throws ApiError. */
  async call(method, path, body = undefined) {
    const response = await this.send(method, path, body);
    return response.json();
  }

  /**
   * POST a streamed chat request and yield its `chat.completion.chunk` objects until
   * `data: [DONE]`. Aborting `signal` closes the connection, which makes the server
   * cancel the generation; the fetch then throws an AbortError, passed on as is.
   */
  async *stream(path, body, signal) {
    const response = await this.send("POST", path, body, signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      let part;
      try {
        part = await reader.read();
      } catch (err) {
        throw networkError(err);
      }
      if (part.done) break;
      buffer += part.value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          throw new ApiError(`The reply failed: ${chunk.error.message}`, { code: chunk.error.code });
        }
        yield chunk;
      }
    }
    throw new ApiError("The connection closed before the reply was complete.");
  }

  async send(method, path, body, signal) {
    const headers = {};
    const key = this.getKey();
    if (key && !/^[\x21-\x7e]+$/.test(key)) {
      throw new ApiError("An API key is printable ASCII without spaces: check it under Settings.",
        { status: 401 });
    }
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(new URL(path, document.baseURI), {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (err) {
      throw networkError(err);
    }
    if (!response.ok) throw await httpError(response, Boolean(key));
    return response;
  }
}

function networkError(err) {
  if (err && err.name === "AbortError") return err;
  return new ApiError(UNREACHABLE);
}

async function httpError(response, keyGiven) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    error = {};
  }
  if (typeof error === "string") error = { message: error }; // /health's {"error": reason}
  const status = response.status;
  const code = error.code || null;
  const message = error.message || response.statusText || "no details";
  let sentence;
  if (status === 401) {
    sentence = keyGiven
      ? "The server refused this API key: check it under Settings."
      : "This server needs an API key: enter it under Settings.";
  } else if (status === 503 && code === "queue_full") {
    const retry = response.headers.get("Retry-After");
    sentence = `The server is busy (its queue is full): try again in ${retry || "a few"} s.`;
  } else if (status === 503) {
    sentence = `The server cannot answer now (${message}): try again shortly.`;
  } else if (code === "conversation_not_found") {
    sentence = "This conversation is no longer on the server (deleted, or another key's).";
  } else if (status >= 500) {
    sentence = `The server failed (${status}): ${message}`;
  } else {
    sentence = `The server refused the request (${status}): ${message}`;
  }
  return new ApiError(sentence, { status, code });
}
