// livenessprobe (stand-in): answers HTTP GET /healthz with 200 when the CSI driver at --csi-address answers
// Probe with ready (or without a ready field), and 500 otherwise.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket")
	endpoint := flag.String("http-endpoint", "", "address of the HTTP server, e.g. :9808")
	healthPort := flag.Int("health-port", 9808, "port of the HTTP server when --http-endpoint is empty")
	probeTimeout := flag.Duration("probe-timeout", time.Second, "timeout of one Probe call")
	flag.Int("v", 0, "log verbosity (accepted for compatibility)")
	flag.String("metrics-address", "", "accepted for compatibility")
	flag.Parse()
	addr := *endpoint
	if addr == "" {
		addr = fmt.Sprintf(":%d", *healthPort)
	}
	conn, err := grpc.NewClient("unix://"+*csiAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatalf("%s: %v", *csiAddress, err)
	}
	identity := csi.NewIdentityClient(conn)
	http.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), *probeTimeout)
		defer cancel()
		resp, err := identity.Probe(ctx, &csi.ProbeRequest{})
		switch {
		case err != nil:
			http.Error(w, "probe failed: "+err.Error(), http.StatusInternalServerError)
		case resp.GetReady() != nil && !resp.GetReady().GetValue():
			http.Error(w, "driver not ready", http.StatusInternalServerError)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	log.Printf("serving /healthz on %s for %s", addr, *csiAddress)
	log.Fatal(http.ListenAndServe(addr, nil))
}
