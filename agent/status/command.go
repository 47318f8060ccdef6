package status

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"
)

// Exit codes of Command.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// Command is the `sovra-agent status` subcommand: it reads a status document
// and prints it for a person (or as JSON with --json). args are the arguments
// after "status"; it returns the process exit code. `--file -` reads the
// document from standard input, so one fetched from a node can be piped in:
//
//	talosctl -n <node> read /var/lib/sovra-agent/status.json | sovra-agent status --file -
func Command(args []string, stdout, stderr io.Writer) int {
	return command(args, os.Stdin, stdout, stderr, time.Now)
}

func command(args []string, stdin io.Reader, stdout, stderr io.Writer, now func() time.Time) int {
	fs := flag.NewFlagSet("sovra-agent status", flag.ContinueOnError)
	fs.SetOutput(stderr)

	var (
		dir    = fs.String("state-dir", DefaultDir, "the agent's state directory")
		file   = fs.String("file", "", "read this status document instead (- for stdin)")
		asJSON = fs.Bool("json", false, "print the document as JSON")
	)

	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: sovra-agent status [--state-dir DIR | --file FILE|-] [--json]\n\n"+
			"Prints the agent's status document. From a workstation:\n"+
			"  talosctl -n <node> read %s | sovra-agent status --file -\n\n", Path(DefaultDir))
		fs.PrintDefaults()
	}

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}

		return exitUsage
	}

	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sovra-agent status: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()

		return exitUsage
	}

	doc, err := load(*dir, *file, stdin)
	if err != nil {
		fmt.Fprintf(stderr, "sovra-agent status: %v\n", err)

		return exitError
	}

	if *asJSON {
		err = writeJSON(stdout, doc)
	} else {
		err = Print(stdout, doc, now())
	}

	if err != nil {
		fmt.Fprintf(stderr, "sovra-agent status: %v\n", err)

		return exitError
	}

	return exitOK
}

func load(dir, file string, stdin io.Reader) (Document, error) {
	switch file {
	case "":
		doc, err := Read(Path(dir))
		if errors.Is(err, os.ErrNotExist) {
			return doc, fmt.Errorf("%w: has the agent started on this node? (talosctl service %s)", err, "ext-sovra-agent")
		}

		return doc, err
	case "-":
		b, err := io.ReadAll(stdin)
		if err != nil {
			return Document{}, fmt.Errorf("reading the status document from stdin: %w", err)
		}

		return Decode(b)
	default:
		return Read(file)
	}
}
