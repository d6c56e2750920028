// Issue a token pair for a subject, then Introspect its access token: the tokensvc
// contract (protos/) loaded at run time by @grpc/proto-loader, no code generator.
//
//   node issue_introspect.js HOST:PORT SUBJECT
//
// Plaintext (a loopback dev server, `make run`) unless TOKENSVC_CA names the CA bundle:
// then TLS, with TOKENSVC_CERT/TOKENSVC_KEY as the client certificate for mTLS (a caller
// the policy allows to Issue). Prints one JSON line; never prints a token.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.join(__dirname, "..", "..", "protos");

function loadTokenService() {
  const definition = protoLoader.loadSync("tokensvc_client/v1/tokensvc.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: session_id, access_token, ...
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).tokensvc.v1.TokenService;
}

function credentials(env) {
  if (!env.TOKENSVC_CA) {
    return grpc.credentials.createInsecure();
  }
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  return grpc.credentials.createSsl(read("TOKENSVC_CA"), read("TOKENSVC_KEY"), read("TOKENSVC_CERT"));
}

// One unary call as a promise, with a deadline: a hung server must not hang the caller.
function call(client, method, request) {
  const deadline = new Date(Date.now() + 5000);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main([target, subject]) {
  if (!target || !subject) {
    throw new Error("usage: node issue_introspect.js HOST:PORT SUBJECT");
  }
  const TokenService = loadTokenService();
  const client = new TokenService(target, credentials(process.env));
  try {
    const issued = await call(client, "Issue", { subject, roles: ["reader"] });
    const info = await call(client, "Introspect", { token: issued.tokens.access_token });
    console.log(
      JSON.stringify({
        session_id: issued.tokens.session_id,
        active: info.active,
        token_type: info.token_type,
        subject: info.subject,
        roles: info.roles,
        expires_at: Number(info.expires_at.seconds),
      }),
    );
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  // a gRPC error: err.code is the status number (grpc.status maps it back to its name)
  const code = err.code === undefined ? "" : `${grpc.status[err.code]}: `;
  console.error(`tokensvc: ${code}${err.details || err.message}`);
  process.exit(1);
});
