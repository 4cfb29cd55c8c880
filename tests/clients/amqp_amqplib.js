// amqplib (Node.js) against ferry-cloud's AMQP front: a confirm channel publishes to a
// fanout exchange, two queues bound to it each get every message, consumers ack; a
// message published with a header exchange binding is routed by its headers.
//
// Usage: node amqp_amqplib.js PORT. Prints OK as its last line when every check passed.
const amqp = require("amqplib");

const port = process.argv[2];

async function main() {
  const conn = await amqp.connect(`amqp://guest:guest@127.0.0.1:${port}`);
  const ch = await conn.createConfirmChannel();
  await ch.assertExchange("node-fan", "fanout", { durable: false });
  for (const q of ["node-a", "node-b"]) {
    await ch.assertQueue(q, { durable: true });
    await ch.bindQueue(q, "node-fan", "");
  }
  await ch.assertExchange("node-hdr", "headers", { durable: false });
  await ch.assertQueue("node-h", { durable: false });
  await ch.bindQueue("node-h", "node-hdr", "", { "x-match": "all", kind: "alarm" });
  for (let i = 0; i < 30; i++) {
    ch.publish("node-fan", "", Buffer.from(`f${i}`), { persistent: true, messageId: `id${i}` });
  }
  ch.publish("node-hdr", "", Buffer.from("quiet"), { headers: { kind: "info" } });
  ch.publish("node-hdr", "", Buffer.from("loud"), { headers: { kind: "alarm" } });
  await ch.waitForConfirms();
  const consume = (q, n) =>
    new Promise((resolve, reject) => {
      const got = [];
      const timer = setTimeout(() => reject(new Error(`${q}: ${got.length} of ${n}`)), 10000);
      ch.consume(q, (m) => {
        got.push(m.content.toString());
        ch.ack(m);
        if (got.length === n) {
          clearTimeout(timer);
          resolve(got);
        }
      });
    });
  const expected = Array.from({ length: 30 }, (_, i) => `f${i}`);
  for (const q of ["node-a", "node-b"]) {
    const got = await consume(q, 30);
    if (JSON.stringify(got) !== JSON.stringify(expected)) throw new Error(`${q}: ${got}`);
  }
  const h = await consume("node-h", 1);
  if (h[0] !== "loud") throw new Error(`headers exchange: ${h}`);
  // Nothing more in node-h: the "info" message matched no binding.
  const left = await ch.checkQueue("node-h");
  if (left.messageCount !== 0) throw new Error(`node-h has ${left.messageCount} left`);
  await ch.close();
  await conn.close();
}

main().then(
  () => console.log("OK"),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
