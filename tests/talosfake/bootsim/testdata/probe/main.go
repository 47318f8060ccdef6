// Command probe stands in for an extension service in the boot simulator's
// tests: it reports what it sees in its container (its environment, PID,
// boot ID and boot time, the files named by PROBE_FILES and whether they
// are writable, what is masked), then waits for SIGTERM.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Report is what the probe prints, one JSON line.
type Report struct {
	Pid      int               `json:"pid"`
	Env      []string          `json:"env"`
	BootID   string            `json:"bootID"`
	BootTime string            `json:"bootTime"`
	Files    map[string]string `json:"files"`
	Writable map[string]string `json:"writable"`
	Root     []string          `json:"root"`
	Firmware []string          `json:"firmware"`
	Security []string          `json:"security"`
}

func main() {
	r := Report{Pid: os.Getpid(), Env: os.Environ(), Files: map[string]string{}, Writable: map[string]string{}}

	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		r.BootID = strings.TrimSpace(string(b))
	}

	if f, err := os.Open("/proc/stat"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "btime "); ok {
				r.BootTime = v
			}
		}

		f.Close()
	}

	for _, p := range strings.Split(os.Getenv("PROBE_FILES"), ",") {
		if p == "" {
			continue
		}

		b, err := os.ReadFile(p)
		if err != nil {
			r.Files[p] = "error: " + err.Error()
		} else {
			r.Files[p] = string(b)
		}

		if f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0); err != nil {
			r.Writable[p] = err.Error()
		} else {
			f.Close()
			r.Writable[p] = "writable"
		}
	}

	r.Root = names("/")
	r.Firmware = names("/sys/firmware")
	r.Security = names("/sys/kernel/security")

	if dir := os.Getenv("PROBE_STATE"); dir != "" {
		count := 0
		if b, err := os.ReadFile(dir + "/starts"); err == nil {
			fmt.Sscan(string(b), &count)
		}

		os.WriteFile(dir+"/starts", []byte(fmt.Sprint(count+1)), 0o600)
	}

	json.NewEncoder(os.Stdout).Encode(r)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	<-sig

	fmt.Println("probe: terminated")
}

func names(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return []string{"error: " + err.Error()}
	}

	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}

	return out
}
