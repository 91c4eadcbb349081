// /docs: Swagger UI (served from the installed swagger-ui-bundle package, no CDN) on /openapi.json.
// A file rather than an inline script so the docs page keeps a strict CSP (script-src 'self').
/* global SwaggerUIBundle */
SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  deepLinking: true,
  validatorUrl: null, // the default badge would fetch from a third-party validator
});
