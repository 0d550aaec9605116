// signin.js: the sign-in view. Checks the API token against the relay
// (GET /api/v1/stats) before starting a session, and says plainly when the
// token is wrong or the relay cannot be reached.

import { h } from "./dom.js";
import { Api } from "./api.js";

/**
 * @param {HTMLElement} root
 * @param {{begin: (token: string, name: string) => void, message: string, name: string}} ctx
 */
export function signInView(root, ctx) {
  const token = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "current-password",
    placeholder: "API token",
    spellcheck: "false",
    autofocus: true,
  });
  const name = h("input", {
    id: "name",
    name: "name",
    type: "text",
    autocomplete: "nickname",
    placeholder: "console",
    maxlength: "64",
    value: ctx.name,
  });
  const error = h("p", { class: "error", id: "signin-error", role: "alert", text: ctx.message });
  error.hidden = !ctx.message;
  const button = h("button", { type: "submit", class: "primary", id: "signin-button", text: "Sign in" });

  async function submit(ev) {
    ev.preventDefault();
    const t = token.value.trim();
    button.disabled = true;
    error.hidden = true;
    try {
      // The check must not end a session: a 401 here only shows the message.
      await new Api(t).stats();
      ctx.begin(t, name.value.trim());
    } catch (e) {
      error.textContent =
        e.status === 401
          ? "Wrong API token. Use the [http] api_token of the relay's configuration."
          : e.status === 0
            ? `${e.message}. Check that the relay is running and try again.`
            : `The relay answered ${e.status}: ${e.message}`;
      error.hidden = false;
      token.select();
    } finally {
      button.disabled = false;
    }
  }

  const form = h(
    "form",
    { class: "card signin", onsubmit: submit, autocomplete: "on" },
    h("h1", { text: "Relay console" }),
    h("p", { class: "muted", text: "Live state of your controllers, commands and alarms." }),
    h("label", { for: "token", text: "API token" }),
    token,
    h("label", { for: "name", text: "Your name (shown on acknowledged alarms)" }),
    name,
    error,
    button,
    h("p", { class: "muted small", text: "The token is kept for this browser tab only and forgotten when it closes." }),
  );
  root.append(h("section", { class: "signin-wrap" }, form));
  token.focus();
  return () => {};
}
