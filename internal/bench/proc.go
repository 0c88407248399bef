package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// clockTick is USER_HZ, the unit of /proc's CPU times; 100 on every Linux
// architecture tcpha runs on (getconf CLK_TCK).
const clockTick = 100.0

// ProcCPU returns the CPU seconds pid's threads have run: the first field
// of each /proc/PID/task/TID/schedstat, in nanoseconds. /proc/PID/stat's
// utime and stime count 10 ms ticks, too coarse for a download that takes
// half a second; it is the fallback when schedstat is missing.
func ProcCPU(pid int) (float64, error) {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	total, ok := 0.0, false
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		if ns, err := parseSchedstat(string(b)); err == nil {
			total, ok = total+ns, true
		}
	}
	if ok {
		return total / 1e9, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

// ProcessCPU returns the CPU seconds of pid's whole thread group,
// threads that ended included (/proc/PID/stat's utime and stime, in 10 ms
// ticks). ProcCPU sums the live threads alone: a BE agent with deliver =
// socket runs each surgery on a thread that ends with it (a private fd
// table), whose time ProcCPU loses, and a sum over live threads can even
// go down across a load.
func ProcessCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

func parseSchedstat(s string) (float64, error) {
	f := strings.Fields(s)
	if len(f) < 1 {
		return 0, fmt.Errorf("empty schedstat")
	}
	return strconv.ParseFloat(f[0], 64)
}

func parseStatCPU(stat string) (float64, error) {
	// The command may contain spaces and parentheses: fields start after
	// the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed stat %q", stat)
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("short stat %q", stat)
	}
	u, err1 := strconv.ParseFloat(f[11], 64)
	s, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("stat times %q %q", f[11], f[12])
	}
	return (u + s) / clockTick, nil
}

// TreeCPU sums ProcCPU over pid and its descendants (nginx's workers,
// HAProxy's master and worker).
func TreeCPU(pid int) float64 {
	total := 0.0
	for _, p := range Tree(pid) {
		if c, err := ProcCPU(p); err == nil {
			total += c
		}
	}
	return total
}

// Tree returns pid and all its descendants.
func Tree(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", out[i]))
		for _, t := range tasks {
			b, _ := os.ReadFile(t)
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

// MachineBusy returns the CPU seconds all cores spent not idle (the first
// line of /proc/stat: everything but idle and iowait), softirq work
// included, which no single process is charged for fairly.
func MachineBusy() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	return parseMachineBusy(string(b))
}

func parseMachineBusy(stat string) (float64, error) {
	line, _, _ := strings.Cut(stat, "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("malformed /proc/stat line %q", line)
	}
	busy := 0.0
	for i, v := range f[1:] {
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return 0, err
		}
		// user nice system idle iowait irq softirq steal guest guest_nice;
		// guest time is already in user.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		busy += n
	}
	return busy / clockTick, nil
}

// RSS returns pid's resident set size in bytes (VmRSS).
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				n, err := strconv.ParseInt(f[0], 10, 64)
				return n << 10, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}
