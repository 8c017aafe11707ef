// gpudeck's own: mounts GraphiQL (loaded from this gateway) on the page at /graphql.
//
// Queries and mutations go to /graphql over HTTP with the headers of the Headers tab, e.g.
// {"Authorization": "Bearer <token>"}. Subscriptions go over a websocket to the same URL
// (graphql-transport-ws); the same headers travel in its connection_init payload, read when
// the socket opens.
(function () {
  "use strict";

  var DEFAULT_QUERY = [
    "# gpudeck GraphiQL. Ctrl-Enter runs the query.",
    "# Admins: put {\"Authorization\": \"Bearer <token>\"} in the Headers tab below,",
    "# then re-fetch the schema (Shift-Ctrl-R) for docs and completion: it needs the token.",
    "{",
    "  health {",
    "    service",
    "    status",
    "  }",
    "}",
    "",
  ].join("\n");

  var httpUrl = window.location.origin + "/graphql";
  var wsUrl = httpUrl.replace(/^http/, "ws");
  var headersText = "";

  function currentHeaders() {
    try {
      var parsed = JSON.parse(headersText || "{}");
      return parsed && typeof parsed === "object" ? parsed : {};
    } catch (e) {
      return {};
    }
  }

  var fetcher = GraphiQL.createFetcher({
    url: httpUrl,
    subscriptionUrl: wsUrl,
    wsConnectionParams: currentHeaders,
  });

  function App() {
    return React.createElement(GraphiQL, {
      fetcher: fetcher,
      defaultQuery: DEFAULT_QUERY,
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: false,
      onEditHeaders: function (text) {
        headersText = text;
      },
    });
  }

  ReactDOM.createRoot(document.getElementById("graphiql")).render(React.createElement(App));
})();
