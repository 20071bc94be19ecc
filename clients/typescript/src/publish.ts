// Publishes one event and prints its id: HERALD_ADDR=127.0.0.1:50051 HERALD_TOKEN=hrld_… node dist/publish.js
import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { randomUUID } from "node:crypto";
import { EventServiceClient, type PublishEventResponse } from "./gen/herald/v1/events";

const client = new EventServiceClient(process.env.HERALD_ADDR ?? "127.0.0.1:50051", credentials.createInsecure());
const auth = new Metadata();
auth.set("authorization", `Bearer ${process.env.HERALD_TOKEN}`);
const event = {
  tenantId: "", eventType: "user.new", entityType: "user", entityId: "42", action: "new",
  payload: JSON.stringify({ entity_type: "user", entity_id: 42, action_type: "new", result: { id: 42 } }),
  idempotencyKey: `idem_${randomUUID()}`, // one per event, the same on every retry
};
const once = () => new Promise<PublishEventResponse>((resolve, reject) =>
  client.publishEvent(event, auth, { deadline: Date.now() + 10_000 }, (err, reply) => (err ? reject(err) : resolve(reply))));

async function publish(attempt = 1): Promise<PublishEventResponse> {
  try {
    return await once();
  } catch (err) {
    // UNAVAILABLE: not stored, or the outcome is unknown; the same key makes the retry safe.
    if ((err as ServiceError).code !== status.UNAVAILABLE || attempt === 4) throw err;
    await new Promise((wake) => setTimeout(wake, 100 * 2 ** attempt));
    return publish(attempt + 1);
  }
}
publish().then((reply) => console.log(reply.eventId)).finally(() => client.close());
