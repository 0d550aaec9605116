"""A paho-mqtt client driven by the relay's MQTT tests.

usage: paho_client.py HOST PORT CLIENT_ID VERSION(3|5) MODE [ARGS...]

  sub FILTER QOS COUNT [CLEAN(1|0)]  subscribe, print READY after SUBACK, then
                                     MSG <topic> <qos> <retain> <payload> per
                                     message; exit after COUNT messages
  pub TOPIC QOS PAYLOAD [RETAIN]     publish once, wait for the flow to end
  hold FILTER QOS                    subscribe, print READY, wait to be killed
                                     (a will is set: topic wills/<id>)

Options come from the environment: MQTT_USER, MQTT_PASS, MQTT_KEEPALIVE (s),
MQTT_TRANSPORT ("websockets": MQTT over WebSocket on PORT, path MQTT_WS_PATH, default
/mqtt); over TLS, MQTT_CAFILE (or MQTT_CA: the CA to verify the server against, for host
"localhost"), and MQTT_CERTFILE and MQTT_KEYFILE (a client certificate). Every wait is
bounded (20 s); a timeout exits with status 3.
"""
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

host, port, cid, version, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
args = sys.argv[6:]
proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
clean = True
if mode == "sub" and len(args) > 3:
    clean = args[3] == "1"
kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto)
if proto == mqtt.MQTTv311:
    kwargs["clean_session"] = clean
transport = os.environ.get("MQTT_TRANSPORT", "tcp")
kwargs["transport"] = transport
c = mqtt.Client(**kwargs)
if transport == "websockets":
    c.ws_set_options(path=os.environ.get("MQTT_WS_PATH", "/mqtt"))
if os.environ.get("MQTT_USER") is not None or os.environ.get("MQTT_PASS") is not None:
    c.username_pw_set(os.environ.get("MQTT_USER", ""), os.environ.get("MQTT_PASS"))
if os.environ.get("MQTT_CAFILE") or os.environ.get("MQTT_CA"):
    c.tls_set(
        ca_certs=os.environ.get("MQTT_CAFILE") or os.environ["MQTT_CA"],
        certfile=os.environ.get("MQTT_CERTFILE"),
        keyfile=os.environ.get("MQTT_KEYFILE"),
    )
if mode == "hold":
    c.will_set("wills/" + cid, b"gone", qos=1)

ready = threading.Event()
done = threading.Event()
got = [0]
state = {}


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def on_connect(client, userdata, flags, rc, props=None):
    out("CONNACK %s %s" % (int(rc.value) if hasattr(rc, "value") else int(rc), int(flags.session_present)))
    if int(rc.value if hasattr(rc, "value") else rc) != 0:
        done.set()
        return
    if mode in ("sub", "hold"):
        client.subscribe(args[0], qos=int(args[1]))
    elif mode == "pub":
        retain = len(args) > 3 and args[3] == "1"
        info = client.publish(args[0], args[2].encode(), qos=int(args[1]), retain=retain)
        state["mid"] = info.mid
        if int(args[1]) == 0:
            done.set()


def on_subscribe(client, userdata, mid, rcs, props=None):
    out("READY " + " ".join(str(int(r.value) if hasattr(r, "value") else int(r)) for r in rcs))
    if mode == "sub" and int(args[2]) == 0:
        done.set()


def on_message(client, userdata, msg):
    out("MSG %s %d %d %s" % (msg.topic, msg.qos, int(msg.retain), msg.payload.decode(errors="replace")))
    got[0] += 1
    if mode == "sub" and got[0] >= int(args[2]):
        done.set()


def on_publish(client, userdata, mid, rc=None, props=None):
    if state.get("mid") == mid:
        out("PUBLISHED")
        done.set()


def on_disconnect(client, userdata, flags, rc=None, props=None):
    out("DISCONNECTED %s" % (int(rc.value) if hasattr(rc, "value") else rc))
    done.set()


c.on_connect = on_connect
c.on_subscribe = on_subscribe
c.on_message = on_message
c.on_publish = on_publish
c.on_disconnect = on_disconnect
keepalive = int(os.environ.get("MQTT_KEEPALIVE", "30"))
if proto == mqtt.MQTTv5:
    from paho.mqtt.properties import Properties
    from paho.mqtt.packettypes import PacketTypes
    p = Properties(PacketTypes.CONNECT)
    if not clean:
        p.SessionExpiryInterval = 600
    c.connect(host, port, keepalive=keepalive, clean_start=clean, properties=p)
else:
    c.connect(host, port, keepalive=keepalive)
c.loop_start()
if mode == "hold":
    time.sleep(60)
    sys.exit(0)
if not done.wait(20):
    out("TIMEOUT")
    sys.exit(3)
if mode == "pub":
    c.disconnect()
    time.sleep(0.2)
c.loop_stop()
sys.exit(0)
