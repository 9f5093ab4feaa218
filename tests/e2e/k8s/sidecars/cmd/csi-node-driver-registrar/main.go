// csi-node-driver-registrar (stand-in): registers a CSI driver with kubelet's plugin watcher.
//
// It asks the driver for its name (GetPluginInfo on --csi-address), serves kubelet's plugin-registration API
// on <--plugin-registration-path>/<driver>-reg.sock, and once kubelet reports success writes a file named
// "registration" beside --kubelet-registration-path. With --mode=kubelet-registration-probe it only checks that
// this file exists (the exec probe of the Helm chart). A failed registration ends the process, so that the
// container restarts and kubelet tries again.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
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

func main() {
	csiAddress := flag.String("csi-address", "/run/csi/socket", "the driver's socket inside this container")
	kubeletPath := flag.String("kubelet-registration-path", "", "the driver's socket as kubelet sees it (host path)")
	pluginDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory")
	mode := flag.String("mode", "registration", "registration | kubelet-registration-probe")
	timeout := flag.Duration("timeout", 10*time.Minute, "how long to wait for the driver")
	flag.Int("v", 0, "log verbosity (accepted for compatibility)")
	flag.String("health-port", "", "accepted for compatibility")
	flag.String("http-endpoint", "", "accepted for compatibility")
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
	log.Printf("serving kubelet plugin registration for %s on %s", name, socket)
	if err := srv.Serve(lis); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
