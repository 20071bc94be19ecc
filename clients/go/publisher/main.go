// Publishes one event and prints its id: HERALD_ADDR=127.0.0.1:50051 HERALD_TOKEN=hrld_… ./publisher
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	heraldv1 "example.com/herald/gen/herald/v1"
)

func main() {
	// Plaintext on loopback (WithInsecure also runs on Debian's older grpc-go); TLS:
	// grpc.WithTransportCredentials(credentials.NewClientTLSFromCert(pool, "")).
	conn, err := grpc.Dial(os.Getenv("HERALD_ADDR"), grpc.WithInsecure())
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	key := make([]byte, 16)
	rand.Read(key)
	event := &heraldv1.PublishEventRequest{
		EventType: "user.new", EntityType: "user", EntityId: "42", Action: "new",
		Payload:        `{"entity_type":"user","entity_id":42,"action_type":"new","result":{"id":42}}`,
		IdempotencyKey: "idem_" + hex.EncodeToString(key), // one per event, the same on every retry
	}
	for attempt := 1; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+os.Getenv("HERALD_TOKEN"))
		reply, err := heraldv1.NewEventServiceClient(conn).PublishEvent(ctx, event)
		cancel()
		// UNAVAILABLE: not stored, or the outcome is unknown; the same key makes the retry safe.
		if status.Code(err) == codes.Unavailable && attempt < 4 {
			time.Sleep(time.Duration(100<<attempt) * time.Millisecond)
			continue
		}
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(reply.EventId)
		return
	}
}
