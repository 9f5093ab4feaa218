// csi-node-driver-registrar (stand-in): registers a CSI driver with kubelet's plugin watcher.
//
// It asks the driver for its name (GetPluginInfo on --csi-address), serves kubelet's plugin-registration API
// on <--plugin-registration-path>/<driver>-reg.sock, and once kubelet reports success writes a file named
// "registration" beside --kubelet-registration-path. With --http-endpoint it serves GET /healthz as upstream
// does (v2.17.0, the Helm chart's liveness and startup probes): 200 "ok" while the registration socket exists
// and answers GetInfo with the driver's name, 404 without the socket, 500 otherwise; the server starts once the
// registration socket listens. --mode=kubelet-registration-probe (deprecated upstream since v2.9, no longer used
// by the chart) still only checks the "registration" file. A failed registration ends the process, so that the
// container restarts and kubelet tries again.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint, probeFile string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: r.driver, Endpoint: r.endpoint,
		SupportedVersions: []string{"1.0.0"}}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		log.Printf("kubelet refused the registration of %s: %s", r.driver, st.Error)
		os.Remove(r.probeFile)
		os.Exit(1)
	}
	log.Printf("registered %s with kubelet (endpoint %s)", r.driver, r.endpoint)
	if err := os.WriteFile(r.probeFile, []byte(r.driver+"\n"), 0o644); err != nil {
		log.Printf("cannot write %s: %v", r.probeFile, err)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func driverName(address string, timeout time.Duration) (string, error) {
	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil {
			return info.GetName(), nil
		}
		if time.Now().After(deadline) {
			return "", err
		}
		log.Printf("waiting for the driver at %s: %v", address, err)
		time.Sleep(time.Second)
	}
}

// checkRegistrationSocket is upstream's health check: the socket kubelet registers through exists, and answers
// GetInfo with this driver's name.
func checkRegistrationSocket(socket, driver string) (int, error) {
	info, err := os.Stat(socket)
	if errors.Is(err, os.ErrNotExist) {
		return http.StatusNotFound, fmt.Errorf("registration socket %s does not exist", socket)
	}
	if err != nil {
		return http.StatusInternalServerError, err
	}
	if info.Mode()&os.ModeSocket == 0 {
		return http.StatusInternalServerError, fmt.Errorf("%s is not a socket", socket)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return http.StatusInternalServerError, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := registerapi.NewRegistrationClient(conn).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return http.StatusInternalServerError, fmt.Errorf("GetInfo on %s: %v", socket, err)
	}
	if got.GetName() != driver {
		return http.StatusInternalServerError, fmt.Errorf("%s answers for %q, not %q", socket, got.GetName(), driver)
	}
	return http.StatusOK, nil
}

func serveHealth(endpoint, socket, driver string) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		code, err := checkRegistrationSocket(socket, driver)
		if err != nil {
			log.Printf("health check failed: %v", err)
			http.Error(w, err.Error(), code)
			return
		}
		fmt.Fprint(w, "ok")
	})
	log.Printf("serving /healthz on %s", endpoint)
	if err := http.ListenAndServe(endpoint, mux); err != nil {
		log.Fatalf("http endpoint %s: %v", endpoint, err)
	}
}

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket inside this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket as kubelet sees it (host path)")
	pluginDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory")
	mode := flag.String("mode", "registration", "registration | kubelet-registration-probe")
	timeout := flag.Duration("timeout", 10*time.Minute, "how long to wait for the driver")
	flag.Int("v", 0, "log verbosity (accepted for compatibility)")
	flag.Int("health-port", 0, "deprecated upstream; accepted for compatibility, use --http-endpoint")
	httpEndpoint := flag.String("http-endpoint", "", "address of the /healthz server, e.g. :9810; empty: none")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}
	probeFile := filepath.Join(filepath.Dir(*kubeletPath), "registration")

	if *mode == "kubelet-registration-probe" {
		if _, err := os.Stat(probeFile); err != nil {
			fmt.Fprintf(os.Stderr, "not registered with kubelet: %v\n", err)
			os.Exit(1)
		}
		fmt.Println("registered with kubelet")
		return
	}
	if *mode != "registration" {
		log.Fatalf("unknown --mode %q", *mode)
	}

	os.Remove(probeFile)
	name, err := driverName(*csiAddress, *timeout)
	if err != nil {
		log.Fatalf("GetPluginInfo on %s: %v", *csiAddress, err)
	}
	socket := filepath.Join(*pluginDir, name+"-reg.sock")
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		log.Fatalf("removing a stale %s: %v", socket, err)
	}
	lis, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listen on %s: %v", socket, err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrar{driver: name, endpoint: *kubeletPath, probeFile: probeFile})

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		srv.Stop()
		os.Remove(socket)
		os.Remove(probeFile)
		os.Exit(0)
	}()
	if *httpEndpoint != "" {
		go serveHealth(*httpEndpoint, socket, name)
	}
	log.Printf("serving kubelet plugin registration for %s on %s", name, socket)
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
