// A compiled meta-plugin doing the flannel plugin's steps, for bench/cni_overhead.py only:
// the figure our Python plugin is held against ("no more than 1.3x what a compiled plugin
// costs"), since no upstream flannel binary is on the machine. Standard library only, so it
// builds offline with the Debian Go toolchain. Per call it does what upstream's plugin does:
// the Go start-up, the netconf and subnet.env parse, the delegate config (ADD: written with
// O_TRUNC and fsync before the delegate runs), one delegate exec with its stdout captured,
// the result decoded and printed again; DEL reads the saved config, delegates, removes it.
// CHECK does what ours does (upstream's is a no-op): the saved config plus prevResult to
// the delegate's CHECK. It is a cost model, not a product: inputs are trusted.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

type netConf struct {
	CNIVersion    string         `json:"cniVersion"`
	Name          string         `json:"name"`
	SubnetFile    string         `json:"subnetFile"`
	DataDir       string         `json:"dataDir"`
	Delegate      map[string]any `json:"delegate"`
	IPAM          map[string]any `json:"ipam"`
	RuntimeConfig map[string]any `json:"runtimeConfig"`
	PrevResult    map[string]any `json:"prevResult"`
}

func fail(format string, args ...any) {
	msg, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "code": 999,
		"msg": fmt.Sprintf(format, args...)})
	os.Stdout.Write(msg)
	os.Exit(1)
}

func subnetEnv(path string) (networks []string, subnet string, mtu uint64, ipmasq bool) {
	f, err := os.Open(path)
	if err != nil {
		fail("failed to load flannel 'subnet.env' file: %v", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		key, value, found := strings.Cut(s.Text(), "=")
		if !found {
			continue
		}
		switch key {
		case "FLANNEL_NETWORK":
			for _, item := range strings.Split(value, ",") {
				_, n, err := net.ParseCIDR(item)
				if err != nil {
					fail("%v", err)
				}
				networks = append(networks, n.String())
			}
		case "FLANNEL_SUBNET":
			_, n, err := net.ParseCIDR(value)
			if err != nil {
				fail("%v", err)
			}
			subnet = n.String()
		case "FLANNEL_MTU":
			mtu, err = strconv.ParseUint(value, 10, 32)
			if err != nil {
				fail("%v", err)
			}
		case "FLANNEL_IPMASQ":
			ipmasq = value == "true"
		}
	}
	return
}

func delegate(command, plugin string, config []byte) []byte {
	var path string
	for _, dir := range filepath.SplitList(os.Getenv("CNI_PATH")) {
		if st, err := os.Stat(filepath.Join(dir, plugin)); err == nil && st.Mode().IsRegular() {
			path = filepath.Join(dir, plugin)
			break
		}
	}
	if path == "" {
		fail("failed to find plugin %q", plugin)
	}
	cmd := exec.Command(path)
	cmd.Env = append(os.Environ(), "CNI_COMMAND="+command)
	cmd.Stdin = bytes.NewReader(config)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		os.Stdout.Write(out)
		os.Exit(1)
	}
	return out
}

func main() {
	command := os.Getenv("CNI_COMMAND")
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("%v", err)
	}
	if command == "VERSION" {
		fmt.Print(`{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}`)
		return
	}
	conf := netConf{SubnetFile: "/run/flannel/subnet.env", DataDir: "/var/lib/cni/flannel"}
	if err := json.Unmarshal(stdin, &conf); err != nil {
		fail("failed to load netconf: %v", err)
	}
	saved := filepath.Join(conf.DataDir, os.Getenv("CNI_CONTAINERID"))
	switch command {
	case "ADD":
		networks, subnet, mtu, ipmasq := subnetEnv(conf.SubnetFile)
		d := map[string]any{"name": conf.Name, "type": "bridge", "ipMasq": !ipmasq, "mtu": mtu,
			"isGateway": true, "cniVersion": conf.CNIVersion}
		for k, v := range conf.Delegate {
			d[k] = v
		}
		if conf.RuntimeConfig != nil {
			d["runtimeConfig"] = conf.RuntimeConfig
		}
		ipam := map[string]any{"type": "host-local"}
		for k, v := range conf.IPAM {
			ipam[k] = v
		}
		ipam["ranges"] = [][]map[string]string{{{"subnet": subnet}}}
		routes := []map[string]string{}
		for _, n := range networks {
			routes = append(routes, map[string]string{"dst": n})
		}
		ipam["routes"] = routes
		d["ipam"] = ipam
		config, _ := json.Marshal(d)
		fmt.Fprintf(os.Stderr, "delegateAdd: netconf sent to delegate plugin:\n%s", config)
		if err := os.MkdirAll(conf.DataDir, 0o700); err != nil {
			fail("%v", err)
		}
		f, err := os.OpenFile(saved, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			fail("%v", err)
		}
		if _, err := f.Write(config); err == nil {
			err = f.Sync()
		}
		f.Close()
		out := delegate("ADD", d["type"].(string), config)
		var result map[string]any // as invoke.DelegateAdd: decoded, then printed again
		if err := json.Unmarshal(out, &result); err != nil {
			fail("%v", err)
		}
		printed, _ := json.MarshalIndent(result, "", "    ")
		os.Stdout.Write(printed)
	case "DEL":
		config, err := os.ReadFile(saved)
		if os.IsNotExist(err) {
			return
		} else if err != nil {
			fail("%v", err)
		}
		var d map[string]any
		if err := json.Unmarshal(config, &d); err != nil {
			return
		}
		delegate("DEL", d["type"].(string), config)
		os.Remove(saved)
	case "CHECK":
		config, err := os.ReadFile(saved)
		if err != nil {
			fail("%v", err)
		}
		var d map[string]any
		if err := json.Unmarshal(config, &d); err != nil {
			fail("%v", err)
		}
		d["prevResult"] = conf.PrevResult
		checked, _ := json.Marshal(d)
		delegate("CHECK", d["type"].(string), checked)
	default:
		fail("unknown CNI_COMMAND %q", command)
	}
}
