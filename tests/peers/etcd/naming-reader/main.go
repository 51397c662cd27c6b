// etcd-naming-reader reads a service the way etcd's gRPC resolver (`etcd:///<name>`) does:
// through the endpoints manager of go.etcd.io/etcd/client/v3/naming/endpoints, whose watch
// channel starts with one Add update per key under `<name>/` that decodes. It prints the
// addresses, sorted, as a JSON array, and fails when an entry under the name does not decode.
//
//	etcd-naming-reader --endpoints 127.0.0.1:2379 api_x   ->   ["10.0.0.1:8080","10.0.0.2:8080"]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/naming/endpoints"
)

func main() {
	eps := flag.String("endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: etcd-naming-reader --endpoints host:port <name>")
		os.Exit(2)
	}
	name := flag.Arg(0)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*eps, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		fail("connecting to etcd: %v", err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	em, err := endpoints.NewManager(cli, name)
	if err != nil {
		fail("endpoints manager: %v", err)
	}
	// The manager skips (and only logs) a value that does not decode: count the keys too.
	keys, err := cli.Get(ctx, name+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		fail("counting the keys under %s/: %v", name, err)
	}
	ch, err := em.NewWatchChannel(ctx)
	if err != nil {
		fail("watch channel: %v", err)
	}
	// The first batch is queued before NewWatchChannel returns, and only when there is one.
	addrs := []string{}
	select {
	case ups := <-ch:
		for _, u := range ups {
			if u.Op == endpoints.Add {
				addrs = append(addrs, u.Endpoint.Addr)
			}
		}
	default:
	}
	if int64(len(addrs)) != keys.Count {
		fail("%d key(s) under %s/ but only %d decode as endpoints", keys.Count, name, len(addrs))
	}
	sort.Strings(addrs)
	if err := json.NewEncoder(os.Stdout).Encode(addrs); err != nil {
		fail("%v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "etcd-naming-reader: "+format+"\n", args...)
	os.Exit(1)
}
