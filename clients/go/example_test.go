package sluice_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	sluice "sluice.dev/clients/go"
)

// Send a record and wait for where it was written. (Compiled, not run: it needs a daemon.)
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := sluice.Connect(ctx, sluice.Config{SocketPath: "/run/sluice/sluice.sock", ClientName: "billing"})
	if err != nil {
		log.Fatal(err) // no daemon, or refused (errors.Is(err, sluice.ErrNotAllowed), ...)
	}
	defer p.Close(context.Background())

	f, err := p.Send(ctx, "payments", sluice.Record{Key: []byte("user-42"), Value: []byte(`{"cents": 1250}`)})
	if err != nil {
		log.Fatal(err) // unknown topic, record too large, ctx ended while the producer was full
	}
	md, err := f.Wait(ctx)
	switch {
	case errors.Is(err, sluice.ErrConnectionLost):
		log.Print("outcome unknown: the daemon may have it; sending again may duplicate it")
	case err != nil:
		log.Printf("failed: %v (retriable: %v)", err, sluice.IsRetriable(err))
	default:
		fmt.Println(md.Topic, md.Partition, md.Offset)
	}
}
